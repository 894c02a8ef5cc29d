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
import { DataType, GraphBuilder } from '../../src/backbone/onnx/graph-builder.js';
import { decodeModel } from '../../src/backbone/onnx/proto.js';
import { GraphEditor } from '../../src/backbone/rewrite/editor.js';
import { buildEngineGraph } from '../../src/backbone/rewrite/index.js';
import { newKvName } from '../../src/backbone/rewrite/kv-cache.js';
import { GREEDY_TOKEN } from '../../src/backbone/rewrite/last-logits.js';
import { addLogprobs, LOGPROBS_ON, LOGSUMEXP, TOP_LOGPROB_IDS, TOP_LOGPROBS } from '../../src/backbone/rewrite/logprobs.js';
import { createSession } from '../../src/backbone/session.js';
import { DeltaBanks } from '../../src/engine/banks.js';
import { planSites } from '../../src/deltas/kinds/index.js';
import { fmt, mdTable, median, minimum, rand } from './common.js';
import { stepFeeds, type RewriteConfigResult } from './rewrite-step.js';

export interface LogprobsBenchOptions {
  /** Timed rounds; each runs every configuration once, back to back. */
  rounds: number;
  context: number;
  batches: number[];
  log?: (msg: string) => void;
}

/** Per batch size, the median and the minimum step time, and the median of the round-by-round ratios to (a). */
type LogprobsConfigResult = Pick<RewriteConfigResult, 'label' | 'median' | 'min'> & { ratio: Map<number, number> };

export interface LogprobsBenchResult {
  opts: LogprobsBenchOptions;
  configs: LogprobsConfigResult[];
  /** The If alone, switched off, at the largest batch: µs it adds to a graph of only the logits' ArgMax (paired median, and the minima's difference). */
  ifAlone: { batch: number; pairedMedianUs: number; minimaUs: number; baseMedianUs: number };
}

const LOGPROB_OUTPUTS = [TOP_LOGPROBS, TOP_LOGPROB_IDS, LOGSUMEXP];
const WITHOUT_LABEL = '(a) graph without the logprobs rewrite, greedy fetch';
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
  const graph = buildEngineGraph(bb, planSites(bb));
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
  const results: LogprobsConfigResult[] = configs.map((c) => ({ label: c.label, median: new Map(), min: new Map(), ratio: new Map() }));
  for (const B of opts.batches) {
    const banks = new DeltaBanks(graph.sites, { maxRows: B, zeroSize: true });
    for (let r = 0; r < B; r++) banks.add(null);
    const base = { ...stepFeeds(bb, B, opts.context), ...banks.feeds() };
    const feeds = configs.map((c) => ({ ...base, ...c.flag }));
    const run = async (i: number) => {
      const t = process.hrtime.bigint();
      await configs[i].session.run(feeds[i], configs[i].fetch);
      return Number(process.hrtime.bigint() - t) / 1e6;
    };
    for (let i = 0; i < configs.length; i++) for (let w = 0; w < 2; w++) await run(i);
    // Every round runs each configuration once, back to back: on a shared, noisy machine the
    // ratio of neighbouring steps is steadier than the ratio of two medians taken apart.
    const times = configs.map(() => [] as number[]);
    for (let round = 0; round < opts.rounds; round++) {
      for (let i = 0; i < configs.length; i++) times[i].push(await run(i));
    }
    results.forEach((r, i) => {
      r.median.set(B, median(times[i]));
      r.min.set(B, minimum(times[i]));
      r.ratio.set(B, median(times[i].map((t, round) => t / times[0][round])));
    });
    log(`  logprobs: batch ${B} done`);
  }
  await withLp.release();
  await without.release();
  return { opts, configs: results, ifAlone: await measureIfAlone(bb.io.vocabSize, Math.max(...opts.batches), opts.rounds * 25) };
}

/**
 * What the switched-off If costs by itself, free of the step's noise: a graph
 * that is only `logits` → ArgMax, with and without the logprobs rewrite,
 * timed in alternation over many runs (a decode step's own variation is
 * larger than the If's whole cost).
 */
async function measureIfAlone(vocab: number, batch: number, runs: number): Promise<LogprobsBenchResult['ifAlone']> {
  const model = (withIf: boolean) => {
    const b = new GraphBuilder();
    b.input('lm_head_output', DataType.FLOAT, ['batch', vocab]);
    b.opNamed('Identity', ['lm_head_output'], 'logits');
    b.opNamed('ArgMax', ['logits'], GREEDY_TOKEN, { axis: -1, keepdims: 0 });
    b.output(GREEDY_TOKEN, DataType.INT64, ['batch']);
    const g = new GraphEditor(b.model('if-alone'));
    if (withIf) addLogprobs(g, vocab);
    return createSession(g.encodeModel());
  };
  const sessions = [await model(false), await model(true)];
  const logits = new ort.Tensor('float32', rand(batch * vocab, 1, 10), [batch, vocab]);
  const feeds: Record<string, ort.Tensor>[] = [{ lm_head_output: logits }, { lm_head_output: logits, [LOGPROBS_ON]: new ort.Tensor('bool', [false], []) }];
  const times: number[][] = [[], []];
  for (let r = 0; r < runs + 20; r++) {
    for (let i = 0; i < 2; i++) {
      const t = process.hrtime.bigint();
      await sessions[i].run(feeds[i], [GREEDY_TOKEN]);
      if (r >= 20) times[i].push(Number(process.hrtime.bigint() - t) / 1e3);
    }
  }
  for (const s of sessions) await s.release();
  return {
    batch,
    pairedMedianUs: median(times[1].map((t, r) => t - times[0][r])),
    minimaUs: minimum(times[1]) - minimum(times[0]),
    baseMedianUs: median(times[0]),
  };
}

const signed = (us: number) => `${us >= 0 ? '+' : '−'}${fmt(Math.abs(us), 0)}`;

export function logprobsTable(res: LogprobsBenchResult): string {
  const { opts, configs } = res;
  const headers = ['configuration', ...opts.batches.flatMap((B) => [`B=${B} ms (median)`, 'min ms', '×(a), paired'])];
  const rows = configs.map((c) => [c.label, ...opts.batches.flatMap((B) => [fmt(c.median.get(B)!), fmt(c.min.get(B)!), fmt(c.ratio.get(B)!, 2)])]);
  return `demo:gpt2-small decode step, context ${opts.context}, default site plan, no deltas; ${opts.rounds} rounds, each running every configuration once ` +
    `(after 2 warm-up steps each); ×(a), paired = the median over rounds of this configuration's step time ÷ (a)'s in the same round\n\n${mdTable(headers, rows)}` +
    `\n\nThe switched-off If by itself, at batch ${res.ifAlone.batch} (a graph of only the logits' ArgMax, ${fmt(res.ifAlone.baseMedianUs, 0)} µs a run, with and without the rewrite, alternated): ` +
    `${signed(res.ifAlone.pairedMedianUs)} µs (paired median), ${signed(res.ifAlone.minimaUs)} µs (difference of the minima).`;
}
