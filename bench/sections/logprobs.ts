/** Section 6 (issue 18): the greedy step with the logprobs If and nobody asking, against the graph without it. */
import { fmt } from '../lib/common.js';
import { logprobsTable, measureLogprobs, NOT_ASKED_LABEL, type LogprobsBenchResult } from '../lib/logprobs-step.js';
import type { BenchSection, Goal } from '../lib/runner.js';
import { yes } from './goals.js';

function logprobsGoals(res: LogprobsBenchResult): Goal[] {
  const b = res.configs.find((c) => c.label === NOT_ASKED_LABEL)!;
  const ratios = res.opts.batches.map((B) => b.ratio.get(B)!);
  return [{
    what: 'Logprobs: a greedy step where no row asks ≤ 1.03× the graph without the logprobs rewrite (issue 18)',
    measured: `paired medians ${ratios.map((r, i) => `B=${res.opts.batches[i]} ${fmt(r, 2)}`).join(', ')}`,
    met: yes(ratios.every((r) => r <= 1.03)),
  }];
}

export const section: BenchSection = {
  name: 'logprobs',
  async run(ctx) {
    const bb = await ctx.backbone();
    const lp = await measureLogprobs(bb, { rounds: ctx.quick ? 10 : 40, context: 64, batches: [1, 8, 32], log: ctx.log });
    return {
      goals: logprobsGoals(lp),
      outputs: [{
        title: '6. Logprobs: the greedy step with and without them (issue 18)',
        body: [
          'session.run of one decode step with the fetches the engine makes (random past, all-ones mask, bare banks). ' +
          'The logprobs (top-5 log-probabilities and ids, log-sum-exp) sit behind an If on `logprobs_on`; (a) is the same graph with that If pruned, ' +
          'as the engine graph was before it. (b) against (a) is what a greedy step pays when nobody asks; (c) what asking costs; ' +
          '(d) what fetching the logits for a JavaScript log-softmax would cost instead.',
          logprobsTable(lp),
        ].join('\n\n'),
      }],
    };
  },
};
