/** Section 8 (issue 12): prompt learning as KV prefixes — TTFT with a cached prefix, decode steps with 20-token prefixes. */
import type * as ort from 'onnxruntime-node';
import { buildEngineGraph } from '../../src/backbone/rewrite/index.js';
import { planSites } from '../../src/deltas/kinds/index.js';
import { measurePrefix, prefixGoals, prefixTables } from '../lib/prefix-step.js';
import type { RewriteBenchResult } from '../lib/rewrite-step.js';
import type { BenchSection } from '../lib/runner.js';
import { DEFAULT_PLAN, REWRITE_KEY } from './rewrite.js';

export const section: BenchSection = {
  name: 'prefix',
  async run(ctx) {
    const bb = await ctx.backbone();
    const q = ctx.quick;
    const cfg = { ttftPairs: q ? 4 : 30, ttftPrompt: 64, decodePrompt: 150, rounds: q ? 2 : 8, perBlock: 3 };
    const g = buildEngineGraph(bb, planSites(bb));
    const { createSession } = await import('../../src/backbone/session.js');
    const rewrite = await ctx.peek<Promise<RewriteBenchResult>>(REWRITE_KEY);
    let engine: ort.InferenceSession;
    if (rewrite) engine = rewrite.sessions.byPlan.get(DEFAULT_PLAN)!;
    else {
      const own = await createSession(g.bytes);
      ctx.onRelease(() => own.release());
      engine = own;
    }
    const res = await measurePrefix(bb, engine, g.sites, { ...cfg, log: ctx.log });
    return {
      goals: prefixGoals(res),
      outputs: [{
        title: '8. Prompt learning: TTFT with a cached prefix, and decode steps with 20-token prefixes (issue 12)',
        body: [
          'The real `Engine` in-process on the default site plan; PEFT PROMPT_TUNING and PREFIX_TUNING deltas (20 virtual tokens) written as files and loaded through the registry. ' +
          `TTFT: one \`Engine.step()\` of a lone request with max_new_tokens 1 (its prefill and first token), a ${cfg.ttftPrompt}-token prompt, bare and prompt-tuned alternated request by request ` +
          '(the prompt-tuned prefix computed once before, as the first request of a task does). Decode: each configuration an Engine of its own, prefilled untimed, pure decode steps of 32 rows alternated one by one (all three feed the same shapes; paired ratios).',
          prefixTables(res),
        ].join('\n\n'),
      }],
    };
  },
};
