/**
 * Helpers for tests of the backbone and its engine-graph rewrite: real ORT
 * sessions over real graphs, KV caches built by the test itself, seeded
 * deltas, and independent reference models with a delta merged in (built by
 * buildDemoGraph with hooks, never by the rewrite under test).
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
import type { GraphBuilder } from '../../src/backbone/onnx/graph-builder.js';
import { createSession } from '../../src/backbone/session.js';
import type { SiteLayout } from '../../src/backbone/rewrite/delta-sites.js';
import { LOGPROBS_ON } from '../../src/backbone/rewrite/logprobs.js';
import { DeltaBanks } from '../../src/engine/banks.js';
import type { Activation, AdapterSite, BiasSite, LoadedDelta, LoraSite } from '../../src/deltas/types.js';

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
  // The engine graph's logprobs switch, off (the original graph ignores the extra feed).
  const f: Record<string, ort.Tensor> = {
    input_ids: i64(step.ids), attention_mask: i64(mask), position_ids: i64(pos), [LOGPROBS_ON]: new ort.Tensor('bool', [false], []),
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

/** Seeded normal-ish floats (mulberry32 + Box–Muller), scaled. */
export function seeded(n: number, seed: number, scale: number): Float32Array {
  let s = seed >>> 0;
  const u = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let x = s;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.sqrt(-2 * Math.log(Math.max(u(), 1e-12))) * Math.cos(2 * Math.PI * u()) * scale;
  return out;
}

function moduleShape(bb: Backbone, module: string) {
  const m = bb.info.modules.find((x) => x.name === module);
  if (!m) throw new Error(`no module ${module} in ${bb.info.name}`);
  return m;
}

function delta(id: string, type: LoadedDelta['type'], rank: number, activation: Activation | null, sites: LoadedDelta['sites']): LoadedDelta {
  const bytes = sites.reduce((n, s) => n + 4 * (s.kind === 'lora' ? s.a.length + s.b.length
    : s.kind === 'adapter' ? s.down.length + s.downBias.length + s.up.length + s.upBias.length : s.bias.length), 0);
  return { id, version: id, type, format: 'peft', rank, activation, sites, bytes };
}

export function loraDelta(bb: Backbone, id: string, modules: string[], rank: number, seed: number, scale = 0.15): LoadedDelta {
  const sites: LoraSite[] = modules.map((module, k) => {
    const { inFeatures: i, outFeatures: o } = moduleShape(bb, module);
    return { kind: 'lora', module, rank, a: seeded(i * rank, seed * 1000 + 2 * k, scale), b: seeded(rank * o, seed * 1000 + 2 * k + 1, scale) };
  });
  return delta(id, 'lora', rank, null, sites);
}

export function adapterDelta(bb: Backbone, id: string, modules: string[], bottleneck: number, activation: Activation, seed: number, scale = 0.15): LoadedDelta {
  const sites: AdapterSite[] = modules.map((module, k) => {
    const { outFeatures: o } = moduleShape(bb, module);
    const s = seed * 1000 + 4 * k;
    return {
      kind: 'adapter', module, bottleneck,
      down: seeded(o * bottleneck, s, scale), downBias: seeded(bottleneck, s + 1, 0.5),
      up: seeded(bottleneck * o, s + 2, scale), upBias: seeded(o, s + 3, 0.1),
    };
  });
  return delta(id, 'adapter', bottleneck, activation, sites);
}

export function bitfitDelta(bb: Backbone, id: string, modules: string[], seed: number, scale = 0.3): LoadedDelta {
  const sites: BiasSite[] = modules.map((module, k) => ({ kind: 'bitfit', module, bias: seeded(moduleShape(bb, module).outFeatures, seed * 1000 + k, scale) }));
  return delta(id, 'bitfit', 0, null, sites);
}

// ---------------------------------------------------------------- merged references

/** Activations written out here, independently of src/backbone/onnx/activations.ts. */
function activation(g: GraphBuilder, kind: Activation, x: string): string {
  switch (kind) {
    case 'relu':
      return g.op('Relu', [x]);
    case 'silu':
      return g.op('Mul', [x, g.op('Sigmoid', [x])]);
    case 'gelu': // 0.5·x·(1 + erf(x/√2))
      return g.op('Mul', [g.op('Mul', [x, g.scalar(0.5)]), g.op('Add', [g.op('Erf', [g.op('Mul', [x, g.scalar(Math.SQRT1_2)])]), g.scalar(1)])]);
    case 'gelu_new': { // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
      const x3 = g.op('Mul', [x, g.op('Mul', [x, x])]);
      const inner = g.op('Mul', [g.op('Add', [x, g.op('Mul', [x3, g.scalar(0.044715)])]), g.scalar(Math.sqrt(2 / Math.PI))]);
      return g.op('Mul', [g.op('Mul', [x, g.scalar(0.5)]), g.op('Add', [g.op('Tanh', [inner]), g.scalar(1)])]);
    }
  }
}

/** Hooks that merge a delta into the demo model: W + a·b; h + up(act(h·down + d)) + u; h + bias. */
export function mergeHooks(d: LoadedDelta | null): BuildHooks {
  if (!d) return {};
  const lora = new Map(d.sites.filter((s): s is LoraSite => s.kind === 'lora').map((s) => [s.module, s]));
  const adapter = new Map(d.sites.filter((s): s is AdapterSite => s.kind === 'adapter').map((s) => [s.module, s]));
  const bitfit = new Map(d.sites.filter((s): s is BiasSite => s.kind === 'bitfit').map((s) => [s.module, s]));
  let n = 0;
  return {
    linearWeight(module, w, inF, outF) {
      const s = lora.get(module);
      if (!s) return w;
      const merged = Float32Array.from(w);
      // Accumulate in double precision: the reference should be the more exact side.
      for (let i = 0; i < inF; i++) {
        for (let o = 0; o < outF; o++) {
          let acc = 0;
          for (let r = 0; r < s.rank; r++) acc += s.a[i * s.rank + r] * s.b[r * outF + o];
          merged[i * outF + o] = w[i * outF + o] + acc;
        }
      }
      return merged;
    },
    linearOutput(g, module, output, outF) {
      let y = output;
      const a = adapter.get(module);
      if (a) {
        const k = n++;
        const down = g.weight(`ref.${k}.down`, a.down, [outF, a.bottleneck]);
        const downBias = g.weight(`ref.${k}.down_bias`, a.downBias, [a.bottleneck]);
        const up = g.weight(`ref.${k}.up`, a.up, [a.bottleneck, outF]);
        const upBias = g.weight(`ref.${k}.up_bias`, a.upBias, [outF]);
        const z = g.op('Add', [g.op('MatMul', [y, down]), downBias]);
        y = g.op('Add', [g.op('Add', [y, g.op('MatMul', [activation(g, d.activation!, z), up])]), upBias]);
      }
      const b = bitfit.get(module);
      if (b) y = g.op('Add', [y, g.weight(`ref.${n++}.bitfit`, b.bias, [outF])]);
      return y;
    },
  };
}

/** A separately built demo model with `d` merged into it. */
export async function mergedSession(spec: DemoSpec, d: LoadedDelta | null): Promise<Session> {
  return createSession(buildDemoGraph(spec, mergeHooks(d)).encode(`ref-${d?.id ?? 'bare'}`));
}

/** A few linear modules of each family that deltas target in the tests. */
export function modulesOf(bb: Backbone, suffixes: string[]): string[] {
  const out = bb.info.modules.map((m) => m.name).filter((n) => suffixes.some((s) => n === s || n.endsWith('.' + s)));
  if (!out.length) throw new Error(`no module of ${bb.info.name} ends with ${suffixes.join(', ')}`);
  return out;
}

/** Which modules each kind of test delta targets, per family (several layers, attention and MLP). */
export function targets(bb: Backbone) {
  return bb.info.family === 'gpt2'
    ? { lora4: ['c_attn'], lora16: ['attn.c_proj', 'mlp.c_fc'], adapter: ['attn.c_proj', 'mlp.c_proj'], bitfit: ['c_attn', 'c_fc'] }
    : { lora4: ['q_proj', 'v_proj'], lora16: ['o_proj', 'gate_proj', 'down_proj'], adapter: ['o_proj', 'down_proj'], bitfit: ['k_proj', 'up_proj'] };
}

/** Banks for `rows` rows, none with a delta: every site fed empty. */
export function bareBanks(sites: SiteLayout[], rows: number): DeltaBanks {
  const banks = new DeltaBanks(sites);
  for (let r = 0; r < rows; r++) banks.setRow(r, null);
  return banks;
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
