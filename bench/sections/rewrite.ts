/** Section 1 (issue 3): the rewritten graph's decode step per batch size, against the original and the no-sites graph. */
import { fmt } from '../lib/common.js';
import { measureRewrite, NO_SITES_LABEL, ORIGINAL_LABEL, rewriteTables, type RewriteBenchResult } from '../lib/rewrite-step.js';
import type { BenchSection, Goal } from '../lib/runner.js';
import { yes } from './goals.js';

export const DEFAULT_PLAN = 'engine, default plan';
/** Where kv and kinds find the sessions this section built, when it ran. */
export const REWRITE_KEY = 'rewrite';

function rewriteGoals(res: RewriteBenchResult, planLabel: string): Goal[] {
  const find = (label: string) => res.configs.find((c) => c.label === label)!;
  const a = find(ORIGINAL_LABEL);
  const a2 = find(NO_SITES_LABEL);
  const none = find(`${planLabel}: no deltas`);
  const l32 = find(`${planLabel}: 32 distinct r16 LoRAs on c_attn`);
  const goals: Goal[] = [];
  const show = (x: Map<number, number>, y: Map<number, number>) => res.opts.batches.map((B) => `B=${B} ${fmt(x.get(B)! / y.get(B)!, 2)}`).join(', ');
  const all = (x: Map<number, number>, y: Map<number, number>, limit: number) => res.opts.batches.every((B) => x.get(B)! / y.get(B)! <= limit);
  goals.push({
    what: 'Rewrite: default plan, no deltas ≤ 1.05× the original graph (issue 3)',
    measured: `medians ${show(none.median, a.median)}; minima ${show(none.min, a.min)}`,
    met: `${yes(all(none.median, a.median, 1.05))} (medians), ${yes(all(none.min, a.min, 1.05))} (minima)`,
  });
  goals.push({
    what: "Rewrite: default plan, no deltas ≤ 1.05× the engine graph with no sites (a') — the same-I/O bare step",
    measured: `medians ${show(none.median, a2.median)}; minima ${show(none.min, a2.min)}`,
    met: `${yes(all(none.median, a2.median, 1.05))} (medians), ${yes(all(none.min, a2.min, 1.05))} (minima)`,
  });
  const B = Math.max(...res.opts.batches);
  const r = (x: Map<number, number>, y: Map<number, number>) => x.get(B)! / y.get(B)!;
  goals.push({
    what: `Rewrite: 32 distinct r16 LoRAs on c_attn ≤ 1.15× the bare step (B=${B})`,
    measured: `vs (a'): ${fmt(r(l32.median, a2.median), 2)} median, ${fmt(r(l32.min, a2.min), 2)} min; vs the same plan with no deltas: ${fmt(r(l32.median, none.median), 2)} median, ${fmt(r(l32.min, none.min), 2)} min`,
    met: `${yes(r(l32.median, a2.median) <= 1.15)} (medians vs a'), ${yes(r(l32.min, a2.min) <= 1.15)} (minima vs a')`,
  });
  return goals;
}

export const section: BenchSection = {
  name: 'rewrite',
  async run(ctx) {
    const bb = await ctx.backbone();
    const cfg = { rounds: ctx.quick ? 2 : 5, perBlock: ctx.quick ? 4 : 8, context: 64, batches: [1, 8, 32] };
    const rewrite = await ctx.shared(REWRITE_KEY, () => measureRewrite(bb, { ...cfg, plans: { [DEFAULT_PLAN]: {} }, log: ctx.log }));
    const s = rewrite.sessions;
    ctx.onRelease(async () => {
      for (const x of [s.original, s.noSites, ...s.byPlan.values()]) await x.release();
    });
    return {
      goals: rewriteGoals(rewrite, DEFAULT_PLAN),
      outputs: [{
        title: '1. Rewrite: decode step per batch size (issue 3)',
        body: [
          `Default site plan = \`planSites(bb)\`: LoRA and bias sites on all 48 linears, adapter sites on each block's attn.c_proj and mlp.c_proj (adapter branches behind an If), IA³ scale sites on c_attn and mlp.c_proj. ` +
          `(a) is the original Optimum graph (returns present = Concat and [B,1,V] logits); (a') the engine graph with no sites (same I/O as the engine: new K/V only, last logits). ` +
          `Context 64, random past, all-ones mask; banks built outside the timed step, as the engine does; at B=1 the LoRA rows hold one LoRA, at B=8 eight.`,
          rewriteTables(rewrite).trim(),
        ].join('\n\n'),
      }],
    };
  },
};
