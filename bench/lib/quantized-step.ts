/**
 * Quantized backbones (issue 17): the engine graph's decode step on
 * demo:gpt2-small in float32 and quantized by `deltaserve quantize` (8-bit and
 * 4-bit in blocks of 32, lm_head float or 4-bit too, activations float32 or
 * int8 — MatMulNBits' accuracy_level 0 or 4), bare and
 * with 32 distinct r16 LoRAs on c_attn, at batch 1, 8 and 32; and the
 * resident memory of a process serving each (its own child process:
 * memory is not given back to the OS between backbones in one process).
 *
 * Timing as section 1: one process, blocks of consecutive same-shape steps,
 * round-robin over every configuration so drift hits all alike; medians and
 * minima.
 */
import { execFile } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import type * as ort from 'onnxruntime-node';
import { loadBackbone, resolveModelDir, type Backbone } from '../../src/backbone/backbone.js';
import { quantizeModelDir, type QuantizeOptions } from '../../src/backbone/quant/quantize-model.js';
import { buildEngineGraph } from '../../src/backbone/rewrite/index.js';
import { createSession } from '../../src/backbone/session.js';
import { planSites } from '../../src/deltas/kinds/index.js';
import { DeltaBanks } from '../../src/engine/banks.js';
import { fmt, mdTable, median, minimum, syntheticCAttnLora } from './common.js';
import { stepFeeds } from './rewrite-step.js';

export interface QuantBenchOptions {
  /** The demo backbone quantized: demo:gpt2-small, or demo:gpt2 in --quick. */
  model: string;
  rounds: number;
  perBlock: number;
  context: number;
  batches: number[];
  log: (msg: string) => void;
}

/** The backbones compared; `quantize` null is the float32 export itself. */
export const VARIANTS: { label: string; quantize: QuantizeOptions | null }[] = [
  { label: 'float32', quantize: null },
  { label: '8-bit', quantize: { bits: 8, blockSize: 32 } },
  { label: '8-bit, int8 activations', quantize: { bits: 8, blockSize: 32, accuracyLevel: 4 } },
  { label: '4-bit', quantize: { bits: 4, blockSize: 32 } },
  { label: '4-bit + lm_head', quantize: { bits: 4, blockSize: 32, includeLmHead: true } },
  { label: '4-bit + lm_head, int8 activations', quantize: { bits: 4, blockSize: 32, includeLmHead: true, accuracyLevel: 4 } },
];

export interface QuantVariantResult {
  label: string;
  /** Bytes of model.onnx on disk. */
  modelBytes: number;
  bare: { median: Map<number, number>; min: Map<number, number> };
  loras: { median: Map<number, number>; min: Map<number, number> };
  rss: { rss: number; maxRss: number } | null;
}

export interface QuantBenchResult {
  opts: QuantBenchOptions;
  variants: QuantVariantResult[];
  seconds: number;
}

const dirName = (model: string, q: QuantizeOptions) => `quant-${model.replace('demo:', '')}-q${q.bits}-b${q.blockSize}${q.includeLmHead ? '-lmhead' : ''}${q.accuracyLevel ? `-acc${q.accuracyLevel}` : ''}`;

/** The model folder of a variant, quantized into the cache on first use. */
export async function variantDir(cacheDir: string, model: string, q: QuantizeOptions | null): Promise<string> {
  const { dir } = await resolveModelDir({ model, cacheDir });
  if (!q) return dir;
  const out = join(cacheDir, dirName(model, q));
  if (!existsSync(join(out, 'model.onnx'))) {
    const tmp = `${out}.tmp-${process.pid}`;
    await quantizeModelDir(dir, tmp, q);
    await rm(out, { recursive: true, force: true });
    await rename(tmp, out);
  }
  return out;
}

const run = promisify(execFile);

/** A separate process loads the variant as the server does, runs decode steps at batch 32 with LoRAs, and reports its RSS. */
async function measureRss(dir: string, cacheDir: string): Promise<{ rss: number; maxRss: number }> {
  const script = fileURLToPath(new URL('./quantized-rss.ts', import.meta.url));
  const { stdout } = await run(process.execPath, ['--expose-gc', '--import', 'tsx', script, dir], { env: { ...process.env, DELTASERVE_CACHE_DIR: cacheDir }, maxBuffer: 1 << 20 });
  return JSON.parse(stdout.trim().split('\n').at(-1)!);
}

export async function measureQuantized(cacheDir: string, opts: QuantBenchOptions): Promise<QuantBenchResult> {
  const t0 = Date.now();
  interface Entry { variant: QuantVariantResult; bb: Backbone; session: ort.InferenceSession; sites: ReturnType<typeof buildEngineGraph>['sites'] }
  const entries: Entry[] = [];
  for (const v of VARIANTS) {
    const t = Date.now();
    const dir = await variantDir(cacheDir, opts.model, v.quantize);
    const bb = await loadBackbone({ model: dir, cacheDir });
    const g = buildEngineGraph(bb, planSites(bb));
    const session = await createSession(g.bytes);
    entries.push({
      variant: { label: v.label, modelBytes: statSync(join(dir, 'model.onnx')).size, bare: { median: new Map(), min: new Map() }, loras: { median: new Map(), min: new Map() }, rss: null },
      bb, session, sites: g.sites,
    });
    opts.log(`  quantized: ${v.label} ready in ${((Date.now() - t) / 1000).toFixed(0)} s`);
  }
  const loras = Array.from({ length: 32 }, (_, k) => syntheticCAttnLora(entries[0].bb, k, 16));
  for (const B of opts.batches) {
    const configs = entries.flatMap((e) => [false, true].map((withLoras) => {
      const banks = new DeltaBanks(e.sites, { maxRows: B, zeroSize: true });
      for (let r = 0; r < B; r++) banks.add(withLoras ? loras[r % 32] : null);
      return { e, withLoras, feeds: { ...stepFeeds(e.bb, B, opts.context), ...banks.feeds() }, times: [] as number[] };
    }));
    for (let round = 0; round < opts.rounds; round++) {
      for (const c of configs) {
        for (let rep = 0; rep <= opts.perBlock; rep++) {
          const t = process.hrtime.bigint();
          await c.e.session.run(c.feeds);
          if (rep > 0) c.times.push(Number(process.hrtime.bigint() - t) / 1e6);
        }
      }
    }
    for (const c of configs) {
      const into = c.withLoras ? c.e.variant.loras : c.e.variant.bare;
      into.median.set(B, median(c.times));
      into.min.set(B, minimum(c.times));
    }
    opts.log(`  quantized: batch ${B} done (${((Date.now() - t0) / 1000).toFixed(0)} s)`);
  }
  const variants = entries.map((e) => e.variant);
  for (const e of entries) await e.session.release();
  entries.length = 0;
  for (const [i, v] of VARIANTS.entries()) {
    variants[i].rss = await measureRss(await variantDir(cacheDir, opts.model, v.quantize), cacheDir);
    opts.log(`  quantized: RSS of ${v.label} ${fmt(variants[i].rss!.maxRss / 2 ** 20, 0)} MiB`);
  }
  return { opts, variants, seconds: (Date.now() - t0) / 1000 };
}

const speedup = (float: Map<number, number>, v: Map<number, number>, B: number) => float.get(B)! / v.get(B)!;

export function quantizedTables(res: QuantBenchResult): string {
  const { batches, context, rounds, perBlock } = res.opts;
  const float = res.variants[0];
  const mib = (n: number) => fmt(n / 2 ** 20, 0);
  const table = (what: string, pick: 'median' | 'min') => [
    `${what}: decode step (session.run of the engine graph, default site plan), context ${context}, ${rounds * perBlock} steps per configuration (${rounds} rounds × ${perBlock}, each block after 1 warm-up step). ` +
    '"× float" is float32\'s time over this one\'s (above 1: faster); "bare/LoRAs" is the bare step\'s time over the step with 32 distinct r16 LoRAs on c_attn (the throughput ratio, 1 = free).',
    '',
    mdTable(
      ['backbone', ...batches.flatMap((B) => [`B=${B} bare ms`, `× float`, `B=${B} LoRAs ms`, `bare/LoRAs`])],
      res.variants.map((v) => [v.label, ...batches.flatMap((B) => [
        fmt(v.bare[pick].get(B)!, 1), fmt(speedup(float.bare[pick], v.bare[pick], B), 2),
        fmt(v.loras[pick].get(B)!, 1), fmt(v.bare[pick].get(B)! / v.loras[pick].get(B)!, 2),
      ])]),
    ),
  ].join('\n');
  const memory = mdTable(
    ['backbone', 'model.onnx MiB', 'peak RSS MiB', 'RSS after steps MiB'],
    res.variants.map((v) => [v.label, mib(v.modelBytes), v.rss ? mib(v.rss.maxRss) : '–', v.rss ? mib(v.rss.rss) : '–']),
  );
  return [
    table('Medians', 'median'), '', table('Minima (the least disturbed step)', 'min'), '',
    'Memory: a separate process per backbone (bench/lib/quantized-rss.ts) loads it as the server does (the parsed model stays in the JS heap), ' +
    'creates the engine session and runs 3 decode steps at batch 32 with 32 r16 LoRAs; peak RSS is its VmHWM (Linux).',
    '', memory,
  ].join('\n');
}

/** The issue's goals, each judged on medians (minima beside them). */
export function quantizedGoals(res: QuantBenchResult): { what: string; measured: string; met: string }[] {
  const [float, ...quantized] = res.variants;
  const B1 = Math.min(...res.opts.batches);
  const Bmax = Math.max(...res.opts.batches);
  const yes = (ok: boolean) => (ok ? 'yes' : '**no**');
  const fourBit = quantized.filter((v) => v.label.startsWith('4-bit'));
  const best = fourBit.reduce((a, v) => (speedup(float.bare.median, v.bare.median, B1) > speedup(float.bare.median, a.bare.median, B1) ? v : a));
  return [
    {
      what: `Quantized: 4-bit decode step at B=${B1} ≥ 3× faster than float32 (issue 17)`,
      measured: fourBit.map((v) => `${v.label}: ${fmt(speedup(float.bare.median, v.bare.median, B1), 2)} median, ${fmt(speedup(float.bare.min, v.bare.min, B1), 2)} min`).join('; '),
      met: `${yes(speedup(float.bare.median, best.bare.median, B1) >= 3)} (best: ${best.label})`,
    },
    {
      what: `Quantized: B=${Bmax} not slower than float32 (issue 17)`,
      measured: quantized.map((v) => `${v.label}: ×${fmt(speedup(float.bare.median, v.bare.median, Bmax), 2)}`).join('; '),
      met: quantized.map((v) => `${v.label} ${yes(speedup(float.bare.median, v.bare.median, Bmax) >= 1)}`).join('; '),
    },
    {
      what: 'Quantized: with 32 distinct r16 LoRAs ≥ 0.9× the bare step\'s throughput on the quantized backbones (issue 17)',
      measured: quantized.map((v) => `${v.label}: ${res.opts.batches.map((B) => `B=${B} ${fmt(v.bare.median.get(B)! / v.loras.median.get(B)!, 2)}`).join(', ')}`).join('; '),
      met: quantized.map((v) => `${v.label} ${yes(res.opts.batches.every((B) => v.bare.median.get(B)! / v.loras.median.get(B)! >= 0.9))}`).join('; '),
    },
  ];
}
