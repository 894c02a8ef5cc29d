/** Section 7 (issue 9): the KV table on a real torch export of GPT-2 small, split attention vs the Concat fallback. */
import { fileURLToPath } from 'node:url';
import { median, ratio } from '../lib/common.js';
import type { BenchSection } from '../lib/runner.js';
import { measureTorchKv, torchGpt2Small, torchKvTable } from '../lib/torch-kv.js';
import { yes } from './goals.js';

const TITLE = '7. KV cache on a real torch export of GPT-2 small (issue 9)';
const QUICK_EXPORT = fileURLToPath(new URL('../../test/fixtures/torch/gpt2', import.meta.url));

export const section: BenchSection = {
  name: 'torch-kv',
  async run(ctx) {
    // --quick: the committed torch-export fixture (2 layers, 64 wide; in CI too, which has no torch); the full run: the full-size export.
    const found = ctx.quick ? { dir: QUICK_EXPORT } : torchGpt2Small(ctx.cacheDir);
    if ('skipped' in found) {
      // CI has no torch: the section says so and passes (the export is a full-size model, not a committed fixture).
      ctx.log(`torch-kv ${found.skipped}`);
      return { goals: [], outputs: [{ title: TITLE, body: `Not measured — ${found.skipped}.` }] };
    }
    const q = ctx.quick;
    // --quick: one context, one round (the path runs; the figures are the full run's).
    const cfg = { batch: 32, contexts: ctx.flags.arg('contexts')?.split(',').map(Number) ?? (q ? [64] : [64, 256, 512, 1000]), rounds: q ? 1 : 4, perBlock: 3, prefillChunkTokens: 4096 };
    const res = await measureTorchKv(found.dir, { ...cfg, log: ctx.log });
    const worst = Math.max(...res.rows.map((r) => median(r.split) / median(r.floor)));
    return {
      goals: [{
        what: 'torch-exported GPT-2 small: Engine.step() at batch 32 ≤ 1.5× its floor at every context (issue 9)',
        measured: res.rows.map((r) => `ctx ${r.ctx}: ${ratio(median(r.split), median(r.floor))} (fallback ${ratio(median(r.fallback), median(r.floor))})`).join('; '),
        met: `${yes(worst <= 1.5)} (medians)`,
      }],
      outputs: [{
        title: TITLE,
        body: [
          (ctx.quick ? `The committed fixture ${QUICK_EXPORT} (\`scripts/export-fixtures.py\`, 2 layers, 64 wide), not GPT-2 small's size: a smoke run. ` : '') +
          `\`scripts/export-fixtures.py --full\`: HF GPT-2 math (eager attention, Conv1D, the fixed causal bias of 1024 positions), random weights, torch.onnx.export opset 14 in Optimum's names. ` +
          'The real `Engine` on the served graph (split attention) and on the same graph with every Concat(past, new) kept (the fallback), each prefilled untimed.',
          torchKvTable(res),
        ].join('\n\n'),
      }],
    };
  },
};
