/**
 * Per-row next-token sampling over one row of a [batch, vocab] logits buffer.
 *
 * Order of operations follows Hugging Face's generate(): repetition penalty,
 * temperature, top-k, top-p (on the top-k survivors, renormalised), then one
 * draw from the row's own seeded generator. Every path is deterministic: the
 * same logits and the same generator state give the same token, and ties
 * always resolve to the lowest id.
 *
 * Cost per token: O(vocab) for greedy and plain temperature; O(vocab log k)
 * with top-k (a bounded heap, never a sort of the vocab); with top-p alone,
 * O(vocab) to bucket tokens by probability plus a sort of only the one bucket
 * where the nucleus ends. Math.exp over the row dominates the sampled paths
 * (~0.5 ms at 50k ids on a slow core).
 */
import type { SamplingParams } from './types.js';
import { createRng, type Rng } from './rng.js';

export type SamplerParams = Pick<SamplingParams, 'temperature' | 'topK' | 'topP' | 'repetitionPenalty' | 'seed'>;

/** Argmax of logits[offset .. offset+vocab); NaN never wins, ties go to the lowest id. */
export function argmax(logits: Float32Array, offset: number, vocab: number): number {
  let best = 0;
  let bestValue = -Infinity;
  for (let i = 0; i < vocab; i++) {
    const v = logits[offset + i];
    if (v > bestValue) {
      bestValue = v;
      best = i;
    }
  }
  return best;
}

/**
 * HF/CTRL repetition penalty, written into `out` (logits stay untouched: the
 * buffer is shared by the batch). A positive logit is divided by the penalty,
 * a negative one multiplied, so a penalty > 1 always makes the token less likely.
 */
export function applyRepetitionPenalty(
  logits: Float32Array,
  offset: number,
  vocab: number,
  seen: Iterable<number>,
  penalty: number,
  out: Float32Array,
): void {
  out.set(logits.subarray(offset, offset + vocab));
  for (const id of seen) {
    if (id < 0 || id >= vocab) continue;
    const v = out[id];
    out[id] = v > 0 ? v / penalty : v * penalty;
  }
}

/** Bucket width in units of scaled logit (e^-0.25 ≈ 0.78 between bucket edges). */
const BUCKET_WIDTH = 0.25;
const BUCKETS = 256;
/** Marks a token with no probability (a -Infinity or NaN logit). */
const NO_BUCKET = BUCKETS;

/**
 * Working buffers. Sampling is synchronous and never re-entered, so one set
 * per thread serves every row, and a step allocates nothing once warm.
 */
class Scratch {
  /** Candidate ids and their logits or weights, best first where order matters. */
  ids = new Int32Array(0);
  keys = new Float64Array(0);
  weights = new Float64Array(0);
  /** Per vocabulary id: its softmax weight and its top-p bucket. */
  rowWeights = new Float64Array(0);
  rowBuckets = new Uint16Array(0);
  readonly bucketMass = new Float64Array(BUCKETS);
  /** The row after the repetition penalty (the batch's logits stay as the model wrote them). */
  penalised = new Float32Array(0);

  ensure(n: number): void {
    if (this.ids.length >= n) return;
    this.ids = new Int32Array(n);
    this.keys = new Float64Array(n);
    this.weights = new Float64Array(n);
  }

  ensureRow(vocab: number): void {
    this.ensure(vocab);
    if (this.rowWeights.length >= vocab) return;
    this.rowWeights = new Float64Array(vocab);
    this.rowBuckets = new Uint16Array(vocab);
  }
}

const scratch = new Scratch();

/** true when (va, ia) ranks above (vb, ib): higher value, then lower id. */
const ranksAbove = (va: number, ia: number, vb: number, ib: number) => va > vb || (va === vb && ia < ib);

/**
 * The k best ids of row, sorted best first, into scratch.ids/keys[0..n).
 * A min-heap of size k (root = worst kept) keeps this O(vocab log k).
 */
function selectTopK(row: Float32Array, vocab: number, k: number): number {
  scratch.ensure(k);
  const ids = scratch.ids;
  const vals = scratch.keys;
  let n = 0;
  const siftDown = (start: number) => {
    let i = start;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let worst = i;
      if (l < n && ranksAbove(vals[worst], ids[worst], vals[l], ids[l])) worst = l;
      if (r < n && ranksAbove(vals[worst], ids[worst], vals[r], ids[r])) worst = r;
      if (worst === i) return;
      swap(ids, vals, i, worst);
      i = worst;
    }
  };
  for (let id = 0; id < vocab; id++) {
    const v = row[id];
    if (v !== v) continue; // NaN
    if (n < k) {
      let i = n++;
      ids[i] = id;
      vals[i] = v;
      while (i > 0) {
        const parent = (i - 1) >> 1;
        if (!ranksAbove(vals[parent], ids[parent], vals[i], ids[i])) break;
        swap(ids, vals, i, parent);
        i = parent;
      }
    } else if (v >= vals[0] && ranksAbove(v, id, vals[0], ids[0])) {
      ids[0] = id;
      vals[0] = v;
      siftDown(0);
    }
  }
  sortBestFirst(ids, vals, 0, n);
  return n;
}

function swap(ids: Int32Array, vals: Float64Array, a: number, b: number): void {
  const ti = ids[a];
  ids[a] = ids[b];
  ids[b] = ti;
  const tv = vals[a];
  vals[a] = vals[b];
  vals[b] = tv;
}

/** Sorts ids/vals[from..to) by value, best first, ties to the lowest id. */
function sortBestFirst(ids: Int32Array, vals: Float64Array, from: number, to: number): void {
  const order = Array.from({ length: to - from }, (_, i) => from + i);
  order.sort((a, b) => vals[b] - vals[a] || ids[a] - ids[b]);
  const sortedIds = order.map((i) => ids[i]);
  const sortedVals = order.map((i) => vals[i]);
  for (let i = 0; i < order.length; i++) {
    ids[from + i] = sortedIds[i];
    vals[from + i] = sortedVals[i];
  }
}

/**
 * Softmax weights of the n sorted top-k survivors at the temperature, cut to
 * the nucleus when topP < 1 (renormalised over the survivors, as Hugging
 * Face's warpers do). Returns how many survive (always ≥ 1).
 */
function topKWeights(n: number, invTemp: number, topP: number): number {
  const { keys, weights } = scratch;
  const max = keys[0];
  let total = 0;
  for (let i = 0; i < n; i++) {
    weights[i] = Math.exp((keys[i] - max) * invTemp);
    total += weights[i];
  }
  if (topP >= 1) return n;
  let cumulative = 0;
  for (let i = 0; i < n; i++) {
    cumulative += weights[i];
    if (cumulative >= topP * total) return i + 1;
  }
  return n;
}

/**
 * Top-p over the whole row, into scratch.ids/weights; returns the count.
 *
 * Tokens are bucketed by how far their scaled logit sits below the maximum.
 * The nucleus is a prefix of the probability order, so with b the first
 * bucket at which the cumulative mass reaches topP, every token of the
 * buckets above b is in it and none below b is: only bucket b is sorted, to
 * find where the nucleus ends inside it. The other members stay in id order,
 * which changes which token a draw lands on but not the distribution.
 */
function topPCandidates(row: Float32Array, vocab: number, invTemp: number, topP: number): number {
  scratch.ensureRow(vocab);
  const { rowWeights, rowBuckets, bucketMass, ids, weights, keys } = scratch;
  const max = row[argmax(row, 0, vocab)];
  bucketMass.fill(0);
  let total = 0;
  for (let id = 0; id < vocab; id++) {
    const d = (max - row[id]) * invTemp;
    if (!(d < Infinity)) {
      rowWeights[id] = 0;
      rowBuckets[id] = NO_BUCKET;
      continue;
    }
    const w = Math.exp(-d);
    const bucket = Math.min(BUCKETS - 1, Math.floor(d / BUCKET_WIDTH));
    rowWeights[id] = w;
    rowBuckets[id] = bucket;
    bucketMass[bucket] += w;
    total += w;
  }

  const target = topP * total;
  let edge = BUCKETS - 1;
  let massAbove = 0;
  for (let b = 0; b < BUCKETS; b++) {
    if (massAbove + bucketMass[b] >= target) {
      edge = b;
      break;
    }
    massAbove += bucketMass[b];
  }

  // Whole buckets first; the edge bucket's tokens are parked at the far end of the buffers.
  let n = 0;
  let parked = vocab;
  for (let id = 0; id < vocab; id++) {
    const bucket = rowBuckets[id];
    if (bucket < edge) {
      ids[n] = id;
      weights[n++] = rowWeights[id];
    } else if (bucket === edge) {
      ids[--parked] = id;
      keys[parked] = rowWeights[id];
    }
  }
  sortBestFirst(ids, keys, parked, vocab);
  let cumulative = massAbove;
  for (let i = parked; i < vocab; i++) {
    ids[n] = ids[i];
    weights[n++] = keys[i];
    cumulative += keys[i];
    if (cumulative >= target) break;
  }
  return n;
}

/** One draw among weights[0..n); the walk never lands on a zero-weight entry. */
function draw(ids: Int32Array, weights: Float64Array, n: number, rng: Rng): number {
  let total = 0;
  for (let i = 0; i < n; i++) total += weights[i];
  const target = rng.next() * total;
  let cumulative = 0;
  let lastPositive = ids[0];
  for (let i = 0; i < n; i++) {
    if (weights[i] <= 0) continue;
    cumulative += weights[i];
    lastPositive = ids[i];
    if (target < cumulative) return ids[i];
  }
  return lastPositive;
}

/** Plain temperature sampling over the whole row, walking ids in order. */
function drawFullRow(row: Float32Array, vocab: number, invTemp: number, rng: Rng): number {
  scratch.ensureRow(vocab);
  const w = scratch.rowWeights;
  const max = row[argmax(row, 0, vocab)];
  for (let id = 0; id < vocab; id++) {
    const v = Math.exp((row[id] - max) * invTemp);
    w[id] = v === v ? v : 0;
  }
  const ids = scratch.ids;
  for (let id = 0; id < vocab; id++) ids[id] = id;
  return draw(ids, w, vocab, rng);
}

/**
 * The sampling state of one request's row: its generator and the ids the
 * repetition penalty looks at (prompt + generated). The engine keeps one per row.
 */
export class RowSampler {
  readonly rng: Rng;
  private readonly seen: Set<number>;

  constructor(
    readonly params: SamplerParams,
    promptIds: Iterable<number>,
  ) {
    this.rng = createRng(params.seed);
    this.seen = new Set(params.repetitionPenalty !== 1 ? promptIds : []);
  }

  /** True when the next token is the plain argmax of the logits, which the graph computes itself. */
  get greedy(): boolean {
    const { temperature, topK, repetitionPenalty } = this.params;
    return (!(temperature > 0) || topK === 1) && repetitionPenalty === 1;
  }

  /** Picks the next token from logits[offset .. offset+vocab) and records it as generated. */
  sample(logits: Float32Array, offset: number, vocab: number): number {
    const id = this.pick(logits, offset, vocab);
    if (this.params.repetitionPenalty !== 1) this.seen.add(id);
    return id;
  }

  private pick(logits: Float32Array, offset: number, vocab: number): number {
    const { temperature, topK, topP, repetitionPenalty } = this.params;
    let row = logits.subarray(offset, offset + vocab);
    if (repetitionPenalty !== 1 && this.seen.size > 0) {
      if (scratch.penalised.length < vocab) scratch.penalised = new Float32Array(vocab);
      const out = scratch.penalised.subarray(0, vocab);
      applyRepetitionPenalty(logits, offset, vocab, this.seen, repetitionPenalty, out);
      row = out;
    }
    const best = argmax(row, 0, vocab);
    // Nothing to sample from when every logit is -Infinity or NaN.
    if (!(temperature > 0) || topK === 1 || !(row[best] > -Infinity)) return best;

    const invTemp = 1 / temperature;
    const useTopK = topK > 0 && topK < vocab;
    const useTopP = topP < 1;
    if (!useTopK && !useTopP) return drawFullRow(row, vocab, invTemp, this.rng);

    const n = useTopK
      ? topKWeights(selectTopK(row, vocab, topK), invTemp, topP)
      : topPCandidates(row, vocab, invTemp, topP);
    return draw(scratch.ids, scratch.weights, n, this.rng);
  }
}
