/** Section 4 (issue 5): the same 32 requests one at a time, through deltaserve and the naive way (merge, new session, plain loop). */
import { fmt, median } from '../lib/common.js';
import { measureNaive, measureSequential, naiveTable, tokensPerSecond, type NaiveResult, type RunResult, type ThroughputResult } from '../lib/serving.js';
import { check, type BenchSection, type Goal } from '../lib/runner.js';
import { yes } from './goals.js';
import { maxNew, servingStack, STREAMS, throughput } from './serving-stack.js';

function naiveGoals(tp: ThroughputResult, naive: NaiveResult): Goal[] {
  const served = median(tp.mixed.map(tokensPerSecond));
  const ms = naive.measured.reduce((a, x) => a + x.totalMs, 0);
  const tokens = naive.measured.reduce((a, x) => a + x.tokens, 0);
  const r = served / (tokens / (ms / 1000));
  return [{
    what: 'deltaserve (32 concurrent, 32 LoRAs) ≥ 10× the naive way (issue 5)',
    measured: `${fmt(r, 1)}× (${fmt(served)} vs ${fmt(tokens / (ms / 1000), 2)} tokens/s; naive measured on ${naive.measured.length} of ${naive.of} requests)`,
    met: yes(r >= 10),
  }];
}

export const section: BenchSection = {
  name: 'naive',
  async run(ctx) {
    const { stack, reqs } = await servingStack(ctx);
    const tp = await throughput(ctx);
    const nSeq = ctx.flags.num('sequential', ctx.quick ? 4 : STREAMS);
    const nNaive = ctx.flags.num('naive', ctx.quick ? 2 : STREAMS);
    ctx.log(`sequential through deltaserve (${Math.min(nSeq, STREAMS)} requests), naive (${Math.min(nNaive, STREAMS)} requests)`);
    let seq: RunResult | null = null;
    let naive: NaiveResult | null = null;
    if (nSeq > 0) seq = await measureSequential(stack, reqs.slice(0, Math.min(nSeq, STREAMS)), maxNew(ctx));
    if (nNaive > 0) {
      naive = await measureNaive(stack, reqs, { n: Math.min(nNaive, STREAMS), maxNew: maxNew(ctx), reference: tp.mixed.at(-1)?.outputs ?? null, log: ctx.log });
      const differ = naive.measured.filter((x) => x.sameAsDeltaserve === false).map((x) => x.i);
      check(differ.length === 0, `naive: requests ${differ.join(', ')} generated other tokens than deltaserve's batched run`);
    }
    for (const [i, ids] of seq?.outputs ?? []) {
      const ref = tp.mixed.at(-1)!.outputs.get(i)!;
      check(ref.length === ids.length && ref.every((x, j) => x === ids[j]), `naive: sequential request ${i} generated other tokens than the batched run`);
    }
    return {
      goals: naive ? naiveGoals(tp, naive) : [],
      outputs: [{
        title: '4. Naive baseline: the same 32 requests, one at a time, each attaching its delta (issue 5)',
        body: [
          'Naive: for each request, `registry.load(id)`, merge the LoRA into the backbone\'s ONNX initializers (W += a·b on each c_attn Gemm weight [in, out]; a [in, r], b [r, out] with the scale folded), ' +
          'encode the model and create an ORT session on it (same options as deltaserve), generate greedily with the plain KV-cache loop at batch 1 on the Optimum graph (present fed back as past), then restore the weights and release the session. ' +
          (naive && naive.measured.length < STREAMS ? `**Only ${naive.measured.length} of ${STREAMS} naive requests were measured; the time for all ${STREAMS} is extrapolated from their mean (tokens/s is the measured rate).** ` : '') +
          (seq && seq.requests < STREAMS ? `The sequential deltaserve run measured ${seq.requests} of ${STREAMS} requests; its ${STREAMS}-request time is extrapolated. ` : '') +
          'The last column divides deltaserve\'s 32-concurrent mixed-LoRA tokens/s (section 3, median) by each way\'s tokens/s.',
          naiveTable(tp, seq, naive, STREAMS),
        ].join('\n\n'),
      }],
    };
  },
};
