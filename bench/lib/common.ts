/** Shared helpers of the benchmarks: statistics, markdown, deterministic data, synthetic deltas, progress. */
import { cpus, homedir, loadavg } from 'node:os';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import type { Backbone } from '../../src/backbone/backbone.js';
import type { DeltaSite, LoadedDelta } from '../../src/deltas/types.js';

/** The model cache every benchmark shares; set before anything loads a demo backbone. */
export function benchCacheDir(): string {
  if (!process.env.DELTASERVE_CACHE_DIR) {
    process.env.DELTASERVE_CACHE_DIR = join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'deltaserve');
  }
  return process.env.DELTASERVE_CACHE_DIR;
}

export function median(xs: readonly number[]): number {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

export function minimum(xs: readonly number[]): number {
  return xs.length ? Math.min(...xs) : NaN;
}

export function maximum(xs: readonly number[]): number {
  return xs.length ? Math.max(...xs) : NaN;
}

/** Nearest-rank percentile (p in 0..100). */
export function percentile(xs: readonly number[], p: number): number {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}

export const fmt = (x: number, digits = 1) => (Number.isFinite(x) ? x.toFixed(digits) : '–');
export const ratio = (a: number, b: number) => fmt(a / b, 2);

/** A markdown table; `align` per column, 'r' right-aligns (numbers). */
export function mdTable(headers: string[], rows: (string | number)[][], align?: ('l' | 'r')[]): string {
  const al = align ?? headers.map((_, i) => (i === 0 ? 'l' : 'r'));
  const lines = [
    `| ${headers.join(' | ')} |`,
    `| ${al.map((a) => (a === 'r' ? '---:' : '---')).join(' | ')} |`,
    ...rows.map((r) => `| ${r.map(String).join(' | ')} |`),
  ];
  return lines.join('\n');
}

/** Deterministic uniform floats in [-scale, scale) (an LCG: same data every run). */
export function rand(n: number, seed: number, scale: number): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = ((s / 4294967296) * 2 - 1) * scale;
  }
  return out;
}

export const i64 = (v: ArrayLike<number>, dims: number[]) =>
  new ort.Tensor('int64', BigInt64Array.from(Array.from(v, (x) => BigInt(x))), dims);

/** A rank-`rank` LoRA on every `c_attn` of the backbone, already in the engine's layout (as the registry would load it). */
export function syntheticCAttnLora(bb: Backbone, k: number, rank = 16): LoadedDelta {
  const sites: DeltaSite[] = bb.info.modules.filter((m) => m.name.endsWith('.c_attn')).map((m, j) => ({
    module: m.name, site: 'lora', axes: { rank },
    data: { lora_a: rand(m.inFeatures * rank, k * 7919 + j, 0.05), lora_b: rand(rank * m.outFeatures, k * 7919 + j + 1000, 0.05) },
  }));
  return { id: `lora-${k}`, version: '1', type: 'lora', format: 'peft', rank, sites, bytes: 0 };
}

const T0 = Date.now();
/** Progress on stderr (stdout carries the tables). */
export function progress(msg: string): void {
  process.stderr.write(`[${((Date.now() - T0) / 1000).toFixed(0).padStart(4)} s] ${msg}\n`);
}

export const seconds = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

export function machine(): { nproc: number; cpu: string; node: string; ort: string; load: string } {
  let cpu = cpus()[0]?.model ?? 'unknown';
  try {
    const m = /^model name\s*:\s*(.+)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'));
    if (m) cpu = m[1].trim();
  } catch {
    // not Linux: keep os.cpus()'s name
  }
  const ortVersion = (() => {
    try {
      return (JSON.parse(readFileSync(new URL('../../node_modules/onnxruntime-node/package.json', import.meta.url), 'utf8')) as { version: string }).version;
    } catch {
      return ort.env.versions?.common ?? 'unknown';
    }
  })();
  return { nproc: cpus().length, cpu, node: process.version, ort: ortVersion, load: loadavg().map((x) => x.toFixed(2)).join(', ') };
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
