/**
 * Helpers for tests of the backbone and its engine-graph rewrite: real ORT
 * sessions over real graphs, KV caches built by the test itself, deltas of
 * every kind loaded by the real registry, and independent reference models
 * with a delta built in (buildDemoGraph with kind-cases.ts's hooks, never by
 * the rewrite under test).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { loadBackbone, type Backbone } from '../../src/backbone/backbone.js';
import type { DecoderIO } from '../../src/backbone/decoder-io.js';
import { buildDemoGraph } from '../../src/backbone/demo/build.js';
import type { BuildHooks } from '../../src/backbone/demo/layers.js';
import { DEMO_SPECS, type DemoSpec } from '../../src/backbone/demo/spec.js';
import { encodeModel } from '../../src/backbone/onnx/proto.js';
import { createSession } from '../../src/backbone/session.js';
import type { SiteLayout } from '../../src/backbone/rewrite/delta-sites.js';
import { buildEngineGraph } from '../../src/backbone/rewrite/index.js';
import { planSites } from '../../src/deltas/kinds/index.js';
import { Registry } from '../../src/deltas/registry.js';
import type { LoadedDelta } from '../../src/deltas/types.js';
import { LOGPROBS_ON } from '../../src/backbone/rewrite/logprobs.js';
import { noPromptEmbeds, PROMPT_EMBEDS } from '../../src/backbone/rewrite/prompt-embeds.js';
import { DeltaBanks } from '../../src/engine/banks.js';
import { writeDelta } from './deltas.js';
import { deltaFiles, encodeTensors, referenceHooks, type TaskSpec } from './kind-cases.js';

export type Session = ort.InferenceSession;

let cacheDir: string | null = null;
/** One temp cache per test process, removed when the process exits. */
export function testCacheDir(): string {
  if (!cacheDir) {
    const dir = mkdtempSync(join(tmpdir(), 'deltaserve-bb-'));
    cacheDir = dir;
    process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
  }
  return cacheDir;
}

export const FAMILIES = ['demo:llama', 'demo:gpt2'] as const;
export type DemoName = (typeof FAMILIES)[number];

export async function demo(model: DemoName | 'demo:gpt2-small', dir = testCacheDir()): Promise<{ bb: Backbone; spec: DemoSpec }> {
  return { bb: await loadBackbone({ model, cacheDir: dir }), spec: DEMO_SPECS[model] };
}

export async function originalSession(bb: Backbone): Promise<Session> {
  return createSession(encodeModel(bb.source.model));
}

// ---------------------------------------------------------------- KV caches

/** A KV cache as the test keeps it: per layer, [batch, kvHeads, len, headDim]. */
export interface KvCache {
  batch: number;
  heads: number;
  len: number;
  dim: number;
  layers: { key: Float32Array; value: Float32Array }[];
}

export function emptyCache(io: DecoderIO, batch: number): KvCache {
  return {
    batch, heads: io.kvHeads, len: 0, dim: io.headDim,
    layers: Array.from({ length: io.layers }, () => ({ key: new Float32Array(0), value: new Float32Array(0) })),
  };
}

/** Concatenates past and new along the sequence axis, by hand. */
export function concatCache(past: KvCache, next: KvCache): KvCache {
  if (past.batch !== next.batch || past.heads !== next.heads || past.dim !== next.dim) throw new Error('cache shapes differ');
  const { batch, heads, dim } = past;
  const len = past.len + next.len;
  const cat = (a: Float32Array, b: Float32Array) => {
    const out = new Float32Array(batch * heads * len * dim);
    for (let bh = 0; bh < batch * heads; bh++) {
      out.set(a.subarray(bh * past.len * dim, (bh + 1) * past.len * dim), bh * len * dim);
      out.set(b.subarray(bh * next.len * dim, (bh + 1) * next.len * dim), bh * len * dim + past.len * dim);
    }
    return out;
  };
  return { batch, heads, len, dim, layers: past.layers.map((l, i) => ({ key: cat(l.key, next.layers[i].key), value: cat(l.value, next.layers[i].value) })) };
}

// ---------------------------------------------------------------- running steps

export interface Step {
  /** [batch][seq] token ids of this step. */
  ids: number[][];
  /** [batch][past+seq]; default all ones. */
  mask?: number[][];
  /** [batch][seq]; default past..past+seq-1. */
  pos?: number[][];
  past: KvCache;
}

const i64 = (rows: number[][]) =>
  new ort.Tensor('int64', BigInt64Array.from(rows.flat().map((v) => BigInt(v))), [rows.length, rows[0].length]);

function baseFeeds(step: Step): Record<string, ort.Tensor> {
  const B = step.ids.length;
  const S = step.ids[0].length;
  const P = step.past.len;
  const mask = step.mask ?? step.ids.map(() => Array(P + S).fill(1));
  const pos = step.pos ?? step.ids.map(() => Array.from({ length: S }, (_, i) => P + i));
  // The engine graph's logprobs switch, off, and no virtual tokens (the original graph ignores the extra feeds).
  const f: Record<string, ort.Tensor> = {
    input_ids: i64(step.ids), attention_mask: i64(mask), position_ids: i64(pos), [LOGPROBS_ON]: new ort.Tensor('bool', [false], []),
    [PROMPT_EMBEDS]: noPromptEmbeds(),
  };
  const { heads, dim } = step.past;
  step.past.layers.forEach((l, i) => {
    f[`past_key_values.${i}.key`] = new ort.Tensor('float32', l.key, [B, heads, P, dim]);
    f[`past_key_values.${i}.value`] = new ort.Tensor('float32', l.value, [B, heads, P, dim]);
  });
  return f;
}

function cacheFrom(out: ort.InferenceSession.OnnxValueMapType, prefix: string, io: DecoderIO): KvCache {
  const k0 = out[`${prefix}.0.key`];
  const [batch, heads, len, dim] = k0.dims;
  return {
    batch, heads, len, dim,
    layers: Array.from({ length: io.layers }, (_, i) => ({
      key: out[`${prefix}.${i}.key`].data as Float32Array,
      value: out[`${prefix}.${i}.value`].data as Float32Array,
    })),
  };
}

/** The original (Optimum-layout) graph: logits [B, S, V] and present = Concat(past, new). */
export async function runOriginal(sess: Session, io: DecoderIO, step: Step) {
  const out = await sess.run(baseFeeds(step));
  return { logits: out.logits.data as Float32Array, dims: out.logits.dims, present: cacheFrom(out, 'present', io) };
}

/** The engine graph: logits [B, V] of the last position, and only this step's K/V. */
export async function runEngine(sess: Session, io: DecoderIO, step: Step, deltaFeeds: Record<string, ort.Tensor> = {}) {
  const out = await sess.run({ ...baseFeeds(step), ...deltaFeeds });
  if (out.logits.dims.length !== 2) throw new Error(`engine logits have dims ${out.logits.dims}`);
  return { logits: out.logits.data as Float32Array, fresh: cacheFrom(out, 'new', io) };
}

/** Logits [B, S, V] → position t of row b. */
export const at = (logits: Float32Array, S: number, V: number, b: number, t: number) =>
  logits.subarray((b * S + t) * V, (b * S + t + 1) * V);
/** Logits [B, V] → row b. */
export const row = (logits: Float32Array, V: number, b: number) => logits.subarray(b * V, (b + 1) * V);

export function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) throw new Error(`lengths differ: ${a.length} vs ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

/** Deterministic token ids in [1, vocab). */
export function tokens(n: number, seed: number, vocab: number): number[] {
  const out: number[] = [];
  let s = seed * 2654435761 >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out.push(1 + (s % (vocab - 1)));
  }
  return out;
}

// ---------------------------------------------------------------- deltas

/** A delta loaded as the server loads it (files written, registered and loaded by the real registry), and its reference hooks. */
export interface KindCase {
  spec: TaskSpec;
  delta: LoadedDelta;
  reference: BuildHooks;
}

/** Registers each spec's files in a store for `bb` (a fresh one unless `storeDir` is given) and loads them back. */
export async function loadCases(bb: Backbone, specs: TaskSpec[], storeDir?: string): Promise<KindCase[]> {
  const dir = join(testCacheDir(), `store-${Math.random().toString(36).slice(2)}`);
  const registry = await Registry.open({ dir: storeDir ?? join(dir, 'deltas'), backbone: bb.info, cacheBytes: 2 ** 30 });
  const out: KindCase[] = [];
  for (const spec of specs) {
    const files = deltaFiles(bb.info, spec);
    await registry.register(spec.id, await writeDelta(join(dir, 'upload', spec.id), encodeTensors(files)), { replace: false });
    out.push({ spec, delta: await registry.load(spec.id), reference: referenceHooks(bb.info, spec, files) });
  }
  return out;
}

/** A separately built demo model with a delta built into it (none: the bare model). */
export async function referenceSession(spec: DemoSpec, c: KindCase | null): Promise<Session> {
  return createSession(buildDemoGraph(spec, c?.reference ?? {}).encode(`ref-${c?.spec.id ?? 'bare'}`));
}

/** The default site plan's engine graph. */
export const defaultGraph = (bb: Backbone) => buildEngineGraph(bb, planSites(bb));

/** Banks for rows carrying these deltas (null: none), in order. */
export function banksOf(sites: readonly SiteLayout[], rows: readonly (LoadedDelta | null)[], zeroSize = true): DeltaBanks {
  const banks = new DeltaBanks(sites, { maxRows: Math.max(1, rows.length), zeroSize });
  for (const d of rows) banks.add(d);
  return banks;
}

/** A delta of every kind for a demo family: several ranks, every activation, both PHM forms, compacters factored (two PHM ranks and bottlenecks) and multiplied out, low-rank adapters of two bottlenecks; each targets a few modules. */
export function everyKind(bb: Backbone): TaskSpec[] {
  const gpt2 = bb.info.family === 'gpt2';
  const t = gpt2
    ? { small: ['c_attn'], mid: ['attn.c_proj', 'mlp.c_fc'], out: ['attn.c_proj', 'mlp.c_proj'], bias: ['c_attn', 'c_fc'], ia3: ['c_attn', 'mlp.c_proj'], ff: ['mlp.c_proj'] }
    : { small: ['q_proj', 'v_proj'], mid: ['o_proj', 'gate_proj', 'down_proj'], out: ['self_attn.o_proj', 'mlp.down_proj'], bias: ['k_proj', 'up_proj'], ia3: ['k_proj', 'v_proj', 'down_proj'], ff: ['down_proj'] };
  return [
    { id: 'lora4', kind: 'peft-lora', rank: 4, targets: t.small, seed: 1 },
    { id: 'lora16', kind: 'opendelta-lora', rank: 16, targets: t.mid, seed: 2 },
    { id: 'relu', kind: 'adapter', bottleneck: 4, activation: 'relu', targets: t.out, seed: 3 },
    { id: 'gelu', kind: 'adapter', bottleneck: 8, activation: 'gelu', targets: t.out.slice(0, 1), seed: 4 },
    { id: 'gelu_new', kind: 'adapter', bottleneck: 6, activation: 'gelu_new', targets: t.out, seed: 5 },
    { id: 'silu', kind: 'adapter', bottleneck: 8, activation: 'silu', targets: t.out.slice(1), seed: 6 },
    { id: 'bitfit', kind: 'bitfit', targets: t.bias, seed: 7 },
    { id: 'ia3', kind: 'ia3', targets: t.ia3, feedforward: t.ff, seed: 8 },
    { id: 'compacter', kind: 'compacter', reductionFactor: 16, n: 4, factorizedPhm: true, factorizedRule: false, activation: 'gelu_new', targets: t.out, seed: 9 },
    { id: 'compacter-r2', kind: 'compacter', reductionFactor: 8, n: 4, factorizedPhm: true, factorizedRule: true, phmRank: 2, activation: 'silu', targets: t.out.slice(0, 1), seed: 13 },
    { id: 'compacter-full', kind: 'compacter', reductionFactor: 8, n: 2, factorizedPhm: false, factorizedRule: true, activation: 'relu', targets: t.out.slice(1), seed: 10 },
    { id: 'low-rank', kind: 'low_rank_adapter', reductionFactor: 16, activation: 'silu', targets: t.out, seed: 11 },
    { id: 'low-rank-wide', kind: 'low_rank_adapter', reductionFactor: 4, activation: 'gelu_new', targets: t.out.slice(0, 1), seed: 14 },
    { id: 'parallel', kind: 'parallel_adapter', bottleneck: 12, scaled: 0.5, activation: 'gelu', targets: t.out, seed: 12 },
  ];
}

/**
 * One full forward of the original graph over prompt + generated (the last one
 * excluded): for each generated token, the logits of the position it follows.
 */
export async function fullForwardLogits(sess: Session, io: DecoderIO, prompt: number[], generated: number[]): Promise<Float32Array[]> {
  const seq = [...prompt, ...generated.slice(0, -1)];
  const { logits } = await runOriginal(sess, io, { ids: [seq], past: emptyCache(io, 1) });
  return generated.map((_, i) => at(logits, seq.length, io.vocabSize, 0, prompt.length - 1 + i));
}

/** The tokens greedy decoding must produce after `prompt`, read off a full forward: each position's argmax. */
export async function fullForwardGreedy(sess: Session, io: DecoderIO, prompt: number[], generated: number[]): Promise<number[]> {
  return (await fullForwardLogits(sess, io, prompt, generated)).map((l) => {
    let best = 0;
    for (let v = 1; v < l.length; v++) if (l[v] > l[best]) best = v;
    return best;
  });
}

/** log-softmax of one row of logits, in double precision (the reference side of logprob checks). */
export function logSoftmax(logits: Float32Array): Float64Array {
  let max = -Infinity;
  for (const x of logits) max = Math.max(max, x);
  let sum = 0;
  for (const x of logits) sum += Math.exp(x - max);
  const lse = max + Math.log(sum);
  return Float64Array.from(logits, (x) => x - lse);
}

/** The n most likely ids of a log-softmax row, best first (ties: lower id first). */
export function topIds(logprobs: Float64Array, n: number): number[] {
  return Array.from(logprobs.keys()).sort((a, b) => logprobs[b] - logprobs[a] || a - b).slice(0, n);
}
