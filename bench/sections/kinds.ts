/** Section 5 (issue 11): decode steps at batch 32 for every delta kind, and the banks' rank fall-back. */
import { kindsGoals, kindsTables, measureKinds } from '../lib/kinds-step.js';
import type { BenchSection } from '../lib/runner.js';
import { defaultPlanEngine } from './rewrite.js';

export const section: BenchSection = {
  name: 'kinds',
  async run(ctx) {
    const { bb, graph: g, engine } = await defaultPlanEngine(ctx);
    const kinds = await measureKinds(bb, engine, g.sites, { rounds: ctx.quick ? 1 : 6, perBlock: ctx.quick ? 2 : 4, log: ctx.log });
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
