/**
 * Issue 5, "KV cache vs floor": the real Engine's decode step at batch 32 and
 * several contexts, against its floor measured in the same run, and the
 * original Optimum graph's step (returns present = Concat) for contrast.
 *
 * The floor is a graph of only what a decode step cannot avoid: the step's
 * weight matmuls (the backbone's own 48 linear Gemms and lm_head, its own
 * initializers, on [batch, in] inputs — GPT-2's Conv1D runs as Gemm on a 2-D
 * view) plus one read of the whole KV cache (a ReduceSum of every past
 * tensor, [batch, kvHeads, ctx, headDim], fed as inputs like the engine feeds
 * its buffers).
 *
 * The engine is stepped through Engine.step() exactly as the worker does.
 * Its rows are prefilled to `ctx - steps` tokens first, so every timed step
 * is a decode-only step at KV capacity `ctx` (asserted: no prefill row, all
 * rows decoding, capacity unchanged).
 */
import * as ort from 'onnxruntime-node';
import type { Backbone } from '../../src/backbone/backbone.js';
import { DataType, GraphBuilder } from '../../src/backbone/onnx/graph-builder.js';
import type { SiteLayout } from '../../src/backbone/rewrite/delta-sites.js';
import { createSession } from '../../src/backbone/session.js';
import { GROWTH_LEAD, GROWTH_STEPS } from '../../src/engine/kv-pool.js';
import { Engine } from '../../src/engine/engine.js';
import { fmt, i64, median, minimum, mdTable, rand, ratio } from './common.js';

/** The floor graph: the step's weight matmuls and one read of every past tensor; one scalar out. */
export function buildFloorGraph(bb: Backbone, parts: { weights: boolean; cache: boolean } = { weights: true, cache: true }): Uint8Array {
  const g = new GraphBuilder();
  const graph = bb.source.model.graph!;
  const inits = new Map((graph.initializer ?? []).map((t) => [t.name!, t]));
  const { layers, kvHeads, headDim } = bb.io;
  const x = new Map<number, string>();
  const inputOf = (features: number) => {
    if (!x.has(features)) x.set(features, g.input(`x${features}`, DataType.FLOAT, ['batch', features]));
    return x.get(features)!;
  };
  const scalars: string[] = [];
  g.scope('/floor', () => {
    for (const m of parts.weights ? bb.linear : []) {
      const ins = [inputOf(m.inFeatures)];
      for (const name of m.node.input!.slice(1)) {
        const t = inits.get(name);
        if (!t) throw new Error(`${m.name}: input ${name} is not an initializer`);
        if (!g.initializers.includes(t)) g.initializer(t);
        ins.push(name);
      }
      const attrs = Object.fromEntries((m.node.attribute ?? []).map((a) => [a.name!, a]));
      const y = g.op(m.node.opType!, ins, m.node.opType === 'Gemm' ? attrs : {});
      scalars.push(g.op('ReduceSum', [y], { keepdims: 0 }));
    }
    for (let l = 0; l < (parts.cache ? layers : 0); l++) {
      for (const kv of ['key', 'value']) {
        const past = g.input(`past.${l}.${kv}`, DataType.FLOAT, ['batch', kvHeads, 'ctx', headDim]);
        scalars.push(g.op('ReduceSum', [past], { keepdims: 0 }));
      }
    }
    g.opNamed('Sum', scalars, 'floor');
  });
  g.output('floor', DataType.FLOAT, []);
  return g.encode('floor');
}

export interface KvFloorOptions {
  batch: number;
  contexts: number[];
  /** Blocks of consecutive engine steps / floor runs, round-robin. */
  rounds: number;
  perBlock: number;
  /** Timed runs of the original graph per context (it costs ~1 s a step at 512). */
  originalRuns: number;
  prefillChunkTokens: number;
  log?: (msg: string) => void;
}

export interface KvFloorRow {
  ctx: number;
  capacity: number;
  pastTokens: [number, number];
  engineStep: number[];
  engineRun: number[];
  floor: number[];
  /** The floor's two halves, each alone: the weight matmuls, the cache read. */
  floorWeights: number[];
  floorCache: number[];
  original: number[];
  prefillSeconds: number;
  prefillRowsInTimedSteps: number;
  /** The steps from the timed window until the capacity switches: the pool copies the cache into the next bucket, spread over them. */
  growthSteps: number[];
  boundaryCapacity: number;
  /** Steps after that one, at the doubled capacity, against the floor at the rows' real context. */
  past: { capacity: number; pastTokens: [number, number]; floorCtx: number; engineStep: number[]; floor: number[] } | null;
}

export interface KvFloorResult {
  opts: KvFloorOptions;
  rows: KvFloorRow[];
  seconds: number;
}

export async function measureKvFloor(
  bb: Backbone,
  sessions: { engine: ort.InferenceSession; engineSites: SiteLayout[]; original: ort.InferenceSession },
  opts: KvFloorOptions,
): Promise<KvFloorResult> {
  const t0 = Date.now();
  const log = opts.log ?? (() => {});
  const { layers, kvHeads, headDim } = bb.io;
  const B = opts.batch;
  let t = Date.now();
  const floor = await createSession(buildFloorGraph(bb));
  const floorWeights = await createSession(buildFloorGraph(bb, { weights: true, cache: false }));
  const floorCache = await createSession(buildFloorGraph(bb, { weights: false, cache: true }));
  log(`  kv: floor sessions in ${((Date.now() - t) / 1000).toFixed(1)} s`);
  const x = (n: number, seed: number) => new ort.Tensor('float32', rand(B * n, seed, 1), [B, n]);
  const xFeeds: Record<string, ort.Tensor> = {};
  for (const m of bb.linear) if (!xFeeds[`x${m.inFeatures}`]) xFeeds[`x${m.inFeatures}`] = x(m.inFeatures, 7 + m.inFeatures);
  /** Random past of `ctx` slots, [B, kvHeads, ctx, headDim] per layer-tensor, keyed by layer and kind. */
  const pastOf = (ctx: number) => {
    const out: { l: number; kv: 'key' | 'value'; tensor: ort.Tensor }[] = [];
    for (let l = 0; l < layers; l++) {
      for (const [j, kv] of (['key', 'value'] as const).entries()) {
        out.push({ l, kv, tensor: new ort.Tensor('float32', rand(B * kvHeads * ctx * headDim, 100 + 2 * l + j, 1), [B, kvHeads, ctx, headDim]) });
      }
    }
    return out;
  };
  const floorFeedsOf = (past: ReturnType<typeof pastOf>) => ({
    all: { ...xFeeds, ...Object.fromEntries(past.map((p) => [`past.${p.l}.${p.kv}`, p.tensor])) } as Record<string, ort.Tensor>,
    weights: xFeeds,
    cache: Object.fromEntries(past.map((p) => [`past.${p.l}.${p.kv}`, p.tensor])) as Record<string, ort.Tensor>,
  });
  const stepsPerContext = opts.rounds * (1 + opts.perBlock);
  const pastRounds = Math.min(2, opts.rounds);
  const rows: KvFloorRow[] = [];

  for (const ctx of opts.contexts) {
    const past = pastOf(ctx);
    const floorFeeds = floorFeedsOf(past);
    const origFeeds: Record<string, ort.Tensor> = {
      input_ids: i64(Array.from({ length: B }, (_, b) => 40 + b), [B, 1]),
      attention_mask: new ort.Tensor('int64', new BigInt64Array(B * (ctx + 1)).fill(1n), [B, ctx + 1]),
      position_ids: i64(Array(B).fill(ctx), [B, 1]),
      ...Object.fromEntries(past.map((p) => [`past_key_values.${p.l}.${p.kv}`, p.tensor])),
    };

    // The engine: 32 rows prefilled so that every timed step decodes at capacity ctx, before the
    // pool starts copying into the next bucket (GROWTH_LEAD slots before it is full).
    const prompt = ctx - stepsPerContext - 1 - GROWTH_LEAD;
    if (prompt < 1) throw new Error(`context ${ctx} is too short for ${stepsPerContext} steps`);
    const engine = new Engine(sessions.engine, bb.io, sessions.engineSites, {
      maxBatch: B, prefillChunkTokens: opts.prefillChunkTokens, eosTokenIds: [], maxPositions: bb.info.maxPositions,
    });
    for (let r = 0; r < B; r++) {
      engine.add({
        rowId: r + 1,
        promptIds: Array.from({ length: prompt }, (_, i) => 32 + ((i * 7 + r * 13) % 95)),
        sampling: { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null },
        maxNewTokens: 100_000, delta: null,
      });
    }
    t = Date.now();
    for (let n = 0; ; n++) {
      const r = await engine.step();
      if (r.stats.decodeRows === B) break;
      if (n > 10_000) throw new Error('prefill never finished');
    }
    const prefillSeconds = (Date.now() - t) / 1000;
    const capacity = () => engine.kvCapacity;
    log(`  kv: ctx ${ctx}: ${B} rows prefilled to ${prompt} tokens in ${prefillSeconds.toFixed(1)} s`);

    const row: KvFloorRow = {
      ctx, capacity: capacity(), pastTokens: [prompt + 1, prompt + stepsPerContext], engineStep: [], engineRun: [],
      floor: [], floorWeights: [], floorCache: [], original: [], prefillSeconds, prefillRowsInTimedSteps: 0,
      growthSteps: [], boundaryCapacity: 0, past: null,
    };
    /** A block of 1 warm-up + perBlock engine steps; every one must be a pure decode step at `cap`. */
    const engineBlock = async (cap: number, into: number[], runs?: number[]) => {
      for (let rep = 0; rep <= opts.perBlock; rep++) {
        const t1 = performance.now();
        const r = await engine.step();
        const ms = performance.now() - t1;
        row.prefillRowsInTimedSteps += r.stats.prefillRows;
        if (r.stats.decodeRows !== B || r.stats.prefillRows !== 0) {
          throw new Error(`ctx ${ctx}: a timed step was not a pure decode step of ${B} rows: ${JSON.stringify(r.stats)}`);
        }
        if (capacity() !== cap) throw new Error(`ctx ${ctx}: KV capacity is ${capacity()}, expected ${cap}`);
        if (rep > 0) {
          into.push(ms);
          runs?.push(r.stats.decodeMs);
        }
      }
    };
    const sessionBlock = async (session: ort.InferenceSession, feeds: Record<string, ort.Tensor>, into: number[], n = opts.perBlock) => {
      for (let rep = 0; rep <= n; rep++) {
        const t1 = performance.now();
        await session.run(feeds);
        if (rep > 0) into.push(performance.now() - t1);
      }
    };
    for (let round = 0; round < opts.rounds; round++) {
      await engineBlock(ctx, row.engineStep, row.engineRun);
      await sessionBlock(floor, floorFeeds.all, row.floor);
      await sessionBlock(floorWeights, floorFeeds.weights, row.floorWeights);
      await sessionBlock(floorCache, floorFeeds.cache, row.floorCache);
      await sessionBlock(sessions.original, origFeeds, row.original, Math.ceil(opts.originalRuns / opts.rounds));
    }
    // The growth window: every step until the capacity switches carries a share of the copy.
    while (capacity() === ctx) {
      const t2 = performance.now();
      await engine.step();
      row.growthSteps.push(performance.now() - t2);
      if (row.growthSteps.length > 2 * GROWTH_LEAD) throw new Error(`ctx ${ctx}: the capacity never grew`);
    }
    row.boundaryCapacity = capacity();

    // Just past the switch: the engine reads the doubled capacity while the rows hold little more than ctx.
    const switchedAt = prompt + stepsPerContext + row.growthSteps.length;
    const first = switchedAt + 2;
    const last = switchedAt + 1 + pastRounds * (1 + opts.perBlock);
    const floorCtx = Math.round((first + last) / 2);
    const pastFloor = floorFeedsOf(pastOf(floorCtx)).all;
    const p = { capacity: row.boundaryCapacity, pastTokens: [first, last] as [number, number], floorCtx, engineStep: [] as number[], floor: [] as number[] };
    for (let round = 0; round < pastRounds; round++) {
      await engineBlock(row.boundaryCapacity, p.engineStep);
      await sessionBlock(floor, pastFloor, p.floor);
    }
    row.past = p;
    rows.push(row);
    log(`  kv: ctx ${ctx}: engine ${fmt(median(row.engineStep))} ms, floor ${fmt(median(row.floor))} ms, original ${fmt(median(row.original))} ms; ` +
      `past the bucket (capacity ${p.capacity}, ${first}–${last} tokens): engine ${fmt(median(p.engineStep))} ms, floor at ${floorCtx} ${fmt(median(p.floor))} ms`);
  }
  for (const s of [floor, floorWeights, floorCache]) await s.release();
  return { opts, rows, seconds: (Date.now() - t0) / 1000 };
}

export function kvFloorTables(res: KvFloorResult): string {
  const { opts } = res;
  const head = ['context (KV capacity)', 'past tokens per row', 'Engine.step() ms', 'its session.run ms', 'floor ms', '(weights only / cache read only ms)', 'step ÷ floor', 'original graph ms', 'original ÷ floor', 'step ÷ original'];
  const table = (pick: (xs: number[]) => number) => mdTable(head, res.rows.map((r) => {
    const step = pick(r.engineStep);
    const fl = pick(r.floor);
    const orig = pick(r.original);
    return [
      `${r.ctx} (${r.capacity})`, `${r.pastTokens[0]}–${r.pastTokens[1]}`, fmt(step), fmt(pick(r.engineRun)), fmt(fl),
      `${fmt(pick(r.floorWeights))} / ${fmt(pick(r.floorCache))}`, `**${ratio(step, fl)}**`, fmt(orig), ratio(orig, fl), ratio(step, orig),
    ];
  }));
  const n = opts.rounds * opts.perBlock;
  const boundary = mdTable(
    ['capacity', 'steps until the switch', 'KV capacity after it', 'step ms during the copy (median / max)', 'median ÷ timed step', 'max ÷ timed step'],
    res.rows.map((r) => [
      r.ctx, r.growthSteps.length, r.boundaryCapacity, `${fmt(median(r.growthSteps))} / ${fmt(Math.max(...r.growthSteps))}`,
      ratio(median(r.growthSteps), median(r.engineStep)), ratio(Math.max(...r.growthSteps), median(r.engineStep)),
    ]),
  );
  const pastRows = res.rows.filter((r) => r.past);
  const pastTable = mdTable(
    ['rows just past the bucket', 'KV capacity', 'Engine.step() ms (median / min)', 'floor at the rows\' context ms (median / min)', 'step ÷ floor (median / min)'],
    pastRows.map((r) => {
      const p = r.past!;
      return [
        `past ${p.pastTokens[0]}–${p.pastTokens[1]} tokens (floor at ${p.floorCtx})`, p.capacity,
        `${fmt(median(p.engineStep))} / ${fmt(minimum(p.engineStep))}`, `${fmt(median(p.floor))} / ${fmt(minimum(p.floor))}`,
        `**${ratio(median(p.engineStep), median(p.floor))}** / ${ratio(minimum(p.engineStep), minimum(p.floor))}`,
      ];
    }),
  );
  return [
    `Batch ${opts.batch}, bare rows, default site plan. Medians of ${n} engine steps and ${n} floor runs (${opts.rounds} rounds × ${opts.perBlock} consecutive, each block after 1 warm-up), original graph ${res.rows[0]?.original.length ?? 0} runs per context. Every timed engine step was a pure decode step (prefill rows in timed steps: ${res.rows.reduce((a, r) => a + r.prefillRowsInTimedSteps, 0)}).`,
    '',
    table(median),
    '',
    'Minima:',
    '',
    table(minimum),
    '',
    `Then the growth window, untimed above: from ${GROWTH_LEAD} free slots before the bucket is full, the pool copies the cache into the next bucket a few layer-tensors a step over ${GROWTH_STEPS} steps, then switches buffers. The whole copy (once per bucket) is spread over these steps instead of stalling one:`,
    '',
    boundary,
    '',
    'Then, with the rows just past the switch, the engine reads the doubled capacity (masked) while the rows hold little more than `ctx` tokens; the floor here reads only the rows\' real context. ' +
      `Medians of ${Math.min(2, opts.rounds) * opts.perBlock} steps. This is the worst case of power-of-two capacity buckets, not the goal's "at every context" measured above:`,
    '',
    pastTable,
  ].join('\n');
}
