/** Fixture builders for delta tests: real files in a temp folder, nothing mocked. */
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { encodeSafetensors, type Dtype, type TensorToWrite } from '../../src/deltas/safetensors.js';
import type { DeltaFile } from '../../src/deltas/types.js';

export async function tempDir(t: TestContext, label: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), `deltaserve-${label}-`));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Deterministic pseudo-random floats in [-scale, scale) (mulberry32). */
export function randomFloats(n: number, seed: number, scale = 0.1): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (s + 0x6d2b79f5) >>> 0;
    let x = s;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    out[i] = ((((x ^ (x >>> 14)) >>> 0) / 4294967296) * 2 - 1) * scale;
  }
  return out;
}

export type Tensors = Record<string, TensorToWrite>;

export function tensor(shape: number[], seed: number, dtype: Dtype = 'F32', scale = 0.1): TensorToWrite {
  return { dtype, shape, data: randomFloats(shape.reduce((a, b) => a * b, 1), seed, scale) };
}

export const PEFT_BASE_CONFIG = {
  peft_type: 'LORA',
  task_type: 'CAUSAL_LM',
  r: 4,
  lora_alpha: 8,
  target_modules: ['c_attn'],
  fan_in_fan_out: true,
  bias: 'none',
  use_rslora: false,
  use_dora: false,
  modules_to_save: null,
  rank_pattern: {},
  alpha_pattern: {},
  layers_to_transform: null,
  layers_pattern: null,
};

/** LoRA factors in PEFT's key layout for the given modules ([name, in, out]). */
export function peftFactors(modules: [string, number, number][], r: number, seed: number, dtype: Dtype = 'F32'): Tensors {
  const out: Tensors = {};
  modules.forEach(([m, i, o], k) => {
    out[`base_model.model.${m}.lora_A.weight`] = tensor([r, i], seed + 2 * k, dtype);
    out[`base_model.model.${m}.lora_B.weight`] = tensor([o, r], seed + 2 * k + 1, dtype);
  });
  return out;
}

/** A delta file's content as bytes: binary as it is, text as UTF-8, an object as its JSON. */
export function fileBytes(content: unknown): Buffer {
  if (content instanceof Uint8Array) return Buffer.from(content);
  return Buffer.from(typeof content === 'string' ? content : JSON.stringify(content, null, 2));
}

export async function writeDelta(dir: string, files: Record<string, unknown>): Promise<DeltaFile[]> {
  await mkdir(dir, { recursive: true });
  const list: DeltaFile[] = [];
  for (const [name, content] of Object.entries(files)) {
    const path = join(dir, name);
    await writeFile(path, fileBytes(content));
    list.push({ name, path });
  }
  return list;
}

export async function writePeft(dir: string, config: Record<string, unknown>, tensors: Tensors): Promise<DeltaFile[]> {
  return writeDelta(dir, {
    'adapter_config.json': { ...PEFT_BASE_CONFIG, ...config },
    'adapter_model.safetensors': encodeSafetensors(tensors),
  });
}

export async function writeOpenDelta(dir: string, config: Record<string, unknown>, tensors: Tensors, weights = 'model.safetensors') {
  return writeDelta(dir, { 'config.json': config, [weights]: encodeSafetensors(tensors) });
}

/** sha256 over every path (dot-folders included) and every file's bytes under dir. */
export async function treeHash(dir: string): Promise<string> {
  const h = createHash('sha256');
  const walk = async (rel: string): Promise<void> => {
    const entries = (await readdir(join(dir, rel), { withFileTypes: true })).sort((a, b) => a.name.localeCompare(b.name));
    for (const e of entries) {
      const p = join(rel, e.name);
      h.update(`${e.isDirectory() ? 'd' : 'f'}:${p}\n`);
      if (e.isDirectory()) await walk(p);
      else h.update(await readFile(join(dir, p)));
    }
  };
  await walk('');
  return h.digest('hex');
}

/**
 * A deliberately separate reader for F32 safetensors, so tests compare the
 * code under test against values taken straight from the bytes.
 */
export async function rawF32(path: string): Promise<Map<string, { shape: number[]; data: number[] }>> {
  const buf = await readFile(path);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const out = new Map<string, { shape: number[]; data: number[] }>();
  for (const [name, e] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    if (e.dtype !== 'F32') throw new Error(`rawF32 reads F32 only, ${name} is ${e.dtype}`);
    const data: number[] = [];
    for (let at = 8 + n + e.data_offsets[0]; at < 8 + n + e.data_offsets[1]; at += 4) data.push(buf.readFloatLE(at));
    out.set(name, { shape: e.shape, data });
  }
  return out;
}

/** Expected bank factors from PEFT-layout factors: a = Aᵀ [in, r], b = scale·Bᵀ [r, out]. */
export function expectedBank(A: ArrayLike<number>, B: ArrayLike<number>, r: number, inF: number, outF: number, scale: number) {
  const a = new Float64Array(inF * r);
  const b = new Float64Array(r * outF);
  for (let k = 0; k < r; k++) {
    for (let i = 0; i < inF; i++) a[i * r + k] = A[k * inF + i];
    for (let o = 0; o < outF; o++) b[k * outF + o] = scale * B[o * r + k];
  }
  return { a, b };
}

export function maxAbsDiff(x: ArrayLike<number>, y: ArrayLike<number>): number {
  if (x.length !== y.length) return Infinity;
  let m = 0;
  for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i] - y[i]));
  return m;
}
