/** Section 2 (issue 5): the real Engine's decode step at batch 32 against its floor. */
import type * as ort from 'onnxruntime-node';
import { buildEngineGraph } from '../../src/backbone/rewrite/index.js';
import { planSites } from '../../src/deltas/kinds/index.js';
import { fmt, median, minimum } from '../lib/common.js';
import { kvFloorTables, measureKvFloor, type KvFloorResult } from '../lib/kv-floor.js';
import type { RewriteBenchResult } from '../lib/rewrite-step.js';
import type { BenchSection, Goal } from '../lib/runner.js';
import { yes } from './goals.js';
import { DEFAULT_PLAN, REWRITE_KEY } from './rewrite.js';

function kvGoals(res: KvFloorResult): Goal[] {
  return [{
    what: 'KV cache: Engine.step() at batch 32 ≤ 1.5× its floor at every context (issue 5)',
    measured: res.rows.map((r) => `ctx ${r.ctx}: ${fmt(median(r.engineStep) / median(r.floor), 2)} median, ${fmt(minimum(r.engineStep) / minimum(r.floor), 2)} min`).join('; '),
    met: `${yes(res.rows.every((r) => median(r.engineStep) / median(r.floor) <= 1.5))} (medians), ${yes(res.rows.every((r) => minimum(r.engineStep) / minimum(r.floor) <= 1.5))} (minima)`,
  }];
}

export const section: BenchSection = {
  name: 'kv',
  async run(ctx) {
    const bb = await ctx.backbone();
    const q = ctx.quick;
    const cfg = {
      batch: 32,
      contexts: (ctx.flags.arg('contexts') ?? (q ? '64' : '64,256,512')).split(',').map(Number),
      rounds: q ? 2 : 6, perBlock: 3, originalRuns: q ? 2 : 3, prefillChunkTokens: 4096,
    };
    const g = buildEngineGraph(bb, planSites(bb));
    const { createSession } = await import('../../src/backbone/session.js');
    const { encodeModel } = await import('../../src/backbone/onnx/proto.js');
    const rewrite = await ctx.peek<Promise<RewriteBenchResult>>(REWRITE_KEY);
    let engine: ort.InferenceSession;
    let original: ort.InferenceSession;
    if (rewrite) {
      engine = rewrite.sessions.byPlan.get(DEFAULT_PLAN)!;
      original = rewrite.sessions.original;
    } else {
      engine = await createSession(g.bytes);
      original = await createSession(encodeModel(bb.source.model));
      ctx.onRelease(async () => {
        await engine.release();
        await original.release();
      });
    }
    const kv = await measureKvFloor(bb, { engine, engineSites: g.sites, original }, { ...cfg, log: ctx.log });
    return {
      goals: kvGoals(kv),
      outputs: [{
        title: '2. KV cache: engine decode step vs its floor (issue 5)',
        body: [
          'The real `Engine` (src/engine/engine.ts) in-process on `createSession(buildEngineGraph(bb, planSites(bb)).bytes)`: 32 rows added with prompts of `ctx − steps − 1` tokens, ' +
          'prefilled (untimed), then `Engine.step()` timed on decode-only steps whose KV capacity is `ctx` (asserted each step). ' +
          'The floor is a GraphBuilder graph of only the 49 weight Gemms of a step (the backbone\'s own initializers, on [32, in] inputs) plus a ReduceSum of every past tensor [32, 12, ctx, 64]; ' +
          'its two halves are also timed alone. The original Optimum graph gets random past of length ctx and returns present = Concat(past, new).',
          kvFloorTables(kv),
        ].join('\n\n'),
      }],
    };
  },
};
