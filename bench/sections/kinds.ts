/** Section 5 (issue 11): decode steps at batch 32 for every delta kind, and the banks' rank fall-back. */
import type * as ort from 'onnxruntime-node';
import { buildEngineGraph } from '../../src/backbone/rewrite/index.js';
import { planSites } from '../../src/deltas/kinds/index.js';
import { kindsGoals, kindsTables, measureKinds } from '../lib/kinds-step.js';
import type { RewriteBenchResult } from '../lib/rewrite-step.js';
import type { BenchSection } from '../lib/runner.js';
import { DEFAULT_PLAN, REWRITE_KEY } from './rewrite.js';

export const section: BenchSection = {
  name: 'kinds',
  async run(ctx) {
    const bb = await ctx.backbone();
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
    const kinds = await measureKinds(bb, engine, g.sites, { rounds: ctx.quick ? 2 : 6, perBlock: 4, log: ctx.log });
    return {
      goals: kindsGoals(kinds),
      outputs: [{
        title: '5. Delta kinds: decode steps at batch 32, and the banks\' rank fall-back (issue 11)',
        body: [
          'The real `Engine` in-process on the default site plan; every configuration an Engine of its own, its rows prefilled untimed, ' +
          'deltas written in their formats (test/helpers/kind-cases.ts) and loaded through the registry; 4 distinct deltas per kind cycled over the rows, 32 distinct r8 LoRAs.',
          kindsTables(kinds),
        ].join('\n\n'),
      }],
    };
  },
};
