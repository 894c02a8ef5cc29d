/**
 * Issue 18, "logprobs without slowing the greedy path": a decode step of the
 * default engine graph at several batch sizes, session.run with the fetches
 * the engine makes, side by side:
 *
 *   (a) the graph without the logprobs rewrite (the engine graph before it), greedy fetch;
 *   (b) the graph with it, no row asking (logprobs_on false), greedy fetch — the path that must keep its speed;
 *   (c) every row asking (logprobs_on true): the greedy token plus the in-graph top-5 and log-sum-exp;
 *   (d) no row asking, the [batch, vocab] logits fetched instead, as a JavaScript log-softmax (or any sampled step) needs.
 */
import * as ort from 'onnxruntime-node';
import type { Backbone } from '../../src/backbone/backbone.js';
import { decodeModel } from '../../src/backbone/onnx/proto.js';
import { GraphEditor } from '../../src/backbone/rewrite/editor.js';
import { buildEngineGraph } from '../../src/backbone/rewrite/index.js';
import { newKvName } from '../../src/backbone/rewrite/kv-cache.js';
import { GREEDY_TOKEN } from '../../src/backbone/rewrite/last-logits.js';
import { LOGPROBS_ON, LOGSUMEXP, TOP_LOGPROB_IDS, TOP_LOGPROBS } from '../../src/backbone/rewrite/logprobs.js';
import { createSession } from '../../src/backbone/session.js';
import { DeltaBanks } from '../../src/engine/banks.js';
import { fmt, mdTable, median, minimum } from './common.js';
import { stepFeeds, type RewriteConfigResult } from './rewrite-step.js';

export interface LogprobsBenchOptions {
  rounds: number;
  perBlock: number;
  context: number;
  batches: number[];
  log?: (msg: string) => void;
}

/** Per batch size, the median and the minimum step time (as section 1 keeps them). */
export type LogprobsConfigResult = Pick<RewriteConfigResult, 'label' | 'median' | 'min'>;

export interface LogprobsBenchResult {
  opts: LogprobsBenchOptions;
  configs: LogprobsConfigResult[];
}

const LOGPROB_OUTPUTS = [TOP_LOGPROBS, TOP_LOGPROB_IDS, LOGSUMEXP];
export const WITHOUT_LABEL = '(a) graph without the logprobs rewrite, greedy fetch';
export const NOT_ASKED_LABEL = '(b) with it, no row asking (greedy fetch)';

/** The engine graph as it was before the logprobs rewrite: its outputs and switch removed, the If pruned. */
function withoutLogprobs(bytes: Uint8Array): Uint8Array {
  const g = new GraphEditor(decodeModel(bytes));
  for (const o of LOGPROB_OUTPUTS) g.removeOutput(o);
  g.inputs.splice(g.inputs.findIndex((i) => i.name === LOGPROBS_ON), 1);
  return g.encodeModel();
}

export async function measureLogprobs(bb: Backbone, opts: LogprobsBenchOptions): Promise<LogprobsBenchResult> {
  const log = opts.log ?? (() => {});
  const graph = buildEngineGraph(bb);
  const withLp = await createSession(graph.bytes);
  const without = await createSession(withoutLogprobs(graph.bytes));
  const kv = Array.from({ length: bb.io.layers }, (_, l) => [newKvName(l, 'key'), newKvName(l, 'value')]).flat();
  const on = (yes: boolean) => ({ [LOGPROBS_ON]: new ort.Tensor('bool', [yes], []) });
  const configs = [
    { label: WITHOUT_LABEL, session: without, flag: {}, fetch: [GREEDY_TOKEN, ...kv] },
    { label: NOT_ASKED_LABEL, session: withLp, flag: on(false), fetch: [GREEDY_TOKEN, ...kv] },
    { label: '(c) with it, every row asking: greedy + top-5 + log-sum-exp', session: withLp, flag: on(true), fetch: [GREEDY_TOKEN, ...LOGPROB_OUTPUTS, ...kv] },
    { label: '(d) with it, no row asking, [batch, vocab] logits fetched', session: withLp, flag: on(false), fetch: ['logits', ...kv] },
  ];
  const results: LogprobsConfigResult[] = configs.map((c) => ({ label: c.label, median: new Map(), min: new Map() }));
  for (const B of opts.batches) {
    const banks = new DeltaBanks(graph.sites);
    for (let r = 0; r < B; r++) banks.setRow(r, null);
    const base = { ...stepFeeds(bb, B, opts.context), ...banks.feeds(B) };
    const times = configs.map(() => [] as number[]);
    // Blocks of consecutive steps per configuration, round-robin, as section 1 does.
    for (let round = 0; round < opts.rounds; round++) {
      for (const [i, c] of configs.entries()) {
        const feeds = { ...base, ...c.flag };
        for (let rep = 0; rep <= opts.perBlock; rep++) {
          const t = process.hrtime.bigint();
          await c.session.run(feeds, c.fetch);
          if (rep > 0) times[i].push(Number(process.hrtime.bigint() - t) / 1e6);
        }
      }
    }
    results.forEach((r, i) => {
      r.median.set(B, median(times[i]));
      r.min.set(B, minimum(times[i]));
    });
    log(`  logprobs: batch ${B} done`);
  }
  await withLp.release();
  await without.release();
  return { opts, configs: results };
}

export function logprobsTable(res: LogprobsBenchResult): string {
  const { opts, configs } = res;
  const a = configs[0];
  const headers = ['configuration', ...opts.batches.flatMap((B) => [`B=${B} ms (median)`, '×(a)', 'min ms', '×(a) min'])];
  const rows = configs.map((c) => [c.label, ...opts.batches.flatMap((B) => [
    fmt(c.median.get(B)!), fmt(c.median.get(B)! / a.median.get(B)!, 2), fmt(c.min.get(B)!), fmt(c.min.get(B)! / a.min.get(B)!, 2),
  ])]);
  return `demo:gpt2-small decode step, context ${opts.context}, default site plan, no deltas; ${opts.rounds * opts.perBlock} steps per configuration (${opts.rounds} rounds × ${opts.perBlock}, each block after 1 warm-up step)\n\n${mdTable(headers, rows)}`;
}
