/** The in-process serving stack sections 3 and 4 share, with its 32 LoRAs and requests, and section 3's figures. */
import { benchRequests, measureThroughput, startBenchStack, type BenchRequest, type BenchStack, type ThroughputResult } from '../lib/serving.js';
import { check, type BenchContext } from '../lib/runner.js';

export const STREAMS = 32;

export interface SharedStack {
  stack: BenchStack;
  reqs: BenchRequest[];
}

export function servingStack(ctx: BenchContext): Promise<SharedStack> {
  return ctx.shared('serving-stack', async () => {
    // The stack's worker and sessions need the memory the in-process sections held.
    await ctx.releaseInProcess();
    ctx.log('real serving stack (startServices: store, registry, engine worker, scheduler, express app)');
    const stack = await startBenchStack({ model: ctx.model, cacheDir: ctx.cacheDir, loras: STREAMS, log: ctx.log });
    ctx.onRelease(() => stack.close(), 'end');
    return { stack, reqs: benchRequests(stack, STREAMS, ctx.flags.num('prompt', 32)) };
  });
}

export const maxNew = (ctx: BenchContext) => ctx.flags.num('max-new', ctx.quick ? 24 : 64);

/** Section 3's rounds; section 4 divides by them, so whichever runs first measures them. */
export function throughput(ctx: BenchContext): Promise<ThroughputResult> {
  return ctx.shared('throughput', async () => {
    const { stack, reqs } = await servingStack(ctx);
    const tp = await measureThroughput(stack, reqs, {
      reps: ctx.flags.num('reps', ctx.quick ? 1 : 5), maxNew: maxNew(ctx), promptTokens: ctx.flags.num('prompt', 32), log: ctx.log,
    });
    // Greedy decoding: every round of one configuration must produce the same tokens, or something is wrong.
    for (const runs of [tp.bare, tp.mixed]) {
      for (const r of runs.slice(1)) {
        for (const [i, ids] of r.outputs) {
          const ref = runs[0].outputs.get(i)!;
          check(ref.length === ids.length && ref.every((x, j) => x === ids[j]), `throughput: ${r.label} request ${i} generated other tokens than in the first ${r.label} round`);
        }
      }
    }
    return tp;
  });
}
