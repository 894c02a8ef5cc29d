/**
 * Issue 9, "torch-kv": the KV table on a real torch export of GPT-2 small's
 * shapes (scripts/export-fixtures.py --full: HF GPT-2 math, eager attention,
 * torch.onnx.export opset 14, random weights). The real Engine's decode step at
 * batch 32 with the split attention (as served) and with the Concat fallback
 * (every layer's Concat(past, new) kept), each against the floor (bench/lib/kv-floor.ts:
 * the step's weight matmuls plus one read of the cache the graph sees),
 * measured side by side, round by round.
 *
 * The export is written into the bench cache once, when /usr/bin/python3 has
 * torch; without torch the section says so and measures nothing.
 */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as ort from 'onnxruntime-node';
import { loadBackbone, type Backbone } from '../../src/backbone/backbone.js';
import { buildEngineGraph } from '../../src/backbone/rewrite/index.js';
import { createSession } from '../../src/backbone/session.js';
import { planSites } from '../../src/deltas/kinds/index.js';
import { Engine } from '../../src/engine/engine.js';
import { capacityBucket, GROWTH_LEAD } from '../../src/engine/kv-pool.js';
import { fmt, mdTable, median, minimum, rand, ratio } from './common.js';
import { buildFloorGraph, type KvFloorOptions } from './kv-floor.js';

const SCRIPT = fileURLToPath(new URL('../../scripts/export-fixtures.py', import.meta.url));
const PYTHON = '/usr/bin/python3';

/** The full-size export's folder, written by the script if absent; null (with why) when torch is missing. */
export function torchGpt2Small(cacheDir: string): { dir: string } | { skipped: string } {
  const dir = join(cacheDir, 'torch-gpt2-small');
  if (existsSync(join(dir, 'model.onnx'))) return { dir };
  try {
    execFileSync(PYTHON, ['-c', 'import torch, onnx'], { stdio: 'ignore' });
  } catch {
    return { skipped: `skipped: no torch export (${dir} is absent and ${PYTHON} cannot import torch and onnx to write it): run \`${PYTHON} scripts/export-fixtures.py --full ${dir}\` where torch is installed, then rerun` };
  }
  execFileSync(PYTHON, [SCRIPT, '--full', dir], { stdio: ['ignore', 'ignore', 'inherit'] });
  return { dir };
}

/** The KV floor's options, without the original graph's runs (this section times the split and Concat graphs). */
export type TorchKvOptions = Omit<KvFloorOptions, 'originalRuns'>;

export interface TorchKvRow {
  ctx: number;
  capacity: number;
  pastTokens: [number, number];
  split: number[];
  fallback: number[];
  floor: number[];
}

export interface TorchKvResult {
  opts: TorchKvOptions;
  rows: TorchKvRow[];
  splitLayers: number;
  layers: number;
  seconds: number;
}

export async function measureTorchKv(dir: string, opts: TorchKvOptions): Promise<TorchKvResult> {
  const t0 = Date.now();
  const log = opts.log ?? (() => {});
  const bb: Backbone = await loadBackbone({ model: dir });
  const plan = planSites(bb);
  const split = buildEngineGraph(bb, plan);
  const fallback = buildEngineGraph(bb, plan, { splitAttention: false });
  const sessions = { split: await createSession(split.bytes), fallback: await createSession(fallback.bytes) };
  const floor = await createSession(buildFloorGraph(bb));
  const { layers, kvHeads, headDim } = bb.io;
  const B = opts.batch;
  const xFeeds: Record<string, ort.Tensor> = {};
  for (const m of bb.linear) xFeeds[`x${m.inFeatures}`] ??= new ort.Tensor('float32', rand(B * m.inFeatures, 7 + m.inFeatures, 1), [B, m.inFeatures]);
  const steps = opts.rounds * (1 + opts.perBlock);
  const rows: TorchKvRow[] = [];

  for (const ctx of opts.contexts) {
    const maxTokens = bb.info.maxPositions - 1;
    const capacity = capacityBucket(ctx, maxTokens);
    // Rows stop short of the point where the pool starts growing into the next bucket (none past the cap).
    const prompt = ctx - steps - 1 - (capacity < maxTokens ? GROWTH_LEAD : 0);
    const engineOf = async (session: ort.InferenceSession, sites: typeof split.sites) => {
      const engine = new Engine(session, bb.io, sites, { maxBatch: B, prefillChunkTokens: opts.prefillChunkTokens, eosTokenIds: [], maxPositions: bb.info.maxPositions });
      for (let r = 0; r < B; r++) {
        engine.add({
          rowId: r + 1, promptIds: Array.from({ length: prompt }, (_, i) => 32 + ((i * 7 + r * 13) % 95)),
          sampling: { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null }, maxNewTokens: 100_000, delta: null,
        });
      }
      for (let n = 0; (await engine.step()).stats.decodeRows !== B; n++) if (n > 10_000) throw new Error('prefill never finished');
      return engine;
    };
    let t = Date.now();
    const engines = { split: await engineOf(sessions.split, split.sites), fallback: await engineOf(sessions.fallback, fallback.sites) };
    log(`  torch-kv: ctx ${ctx}: 2 × ${B} rows prefilled to ${prompt} tokens in ${((Date.now() - t) / 1000).toFixed(1)} s`);
    const past: Record<string, ort.Tensor> = {};
    for (let l = 0; l < layers; l++) {
      for (const kv of ['key', 'value']) past[`past.${l}.${kv}`] = new ort.Tensor('float32', rand(B * kvHeads * capacity * headDim, 100 + l, 1), [B, kvHeads, capacity, headDim]);
    }
    const row: TorchKvRow = { ctx, capacity, pastTokens: [prompt + 1, prompt + steps], split: [], fallback: [], floor: [] };
    const block = async (run: () => Promise<unknown>, into: number[], check?: () => void) => {
      for (let rep = 0; rep <= opts.perBlock; rep++) {
        const t1 = performance.now();
        await run();
        if (rep > 0) into.push(performance.now() - t1);
        check?.();
      }
    };
    const decodeAt = (engine: Engine) => async () => {
      const r = await engine.step();
      if (r.stats.decodeRows !== B || r.stats.prefillRows !== 0) throw new Error(`ctx ${ctx}: not a pure decode step of ${B} rows`);
      if (engine.kvCapacity !== capacity) throw new Error(`ctx ${ctx}: KV capacity ${engine.kvCapacity}, expected ${capacity}`);
    };
    for (let round = 0; round < opts.rounds; round++) {
      await block(decodeAt(engines.split), row.split);
      await block(decodeAt(engines.fallback), row.fallback);
      await block(() => floor.run({ ...xFeeds, ...past }), row.floor);
    }
    rows.push(row);
    log(`  torch-kv: ctx ${ctx}: split ${fmt(median(row.split))} ms, fallback ${fmt(median(row.fallback))} ms, floor ${fmt(median(row.floor))} ms`);
  }
  for (const s of [sessions.split, sessions.fallback, floor]) await s.release();
  return { opts, rows, splitLayers: split.splitLayers, layers, seconds: (Date.now() - t0) / 1000 };
}

export function torchKvTable(res: TorchKvResult): string {
  const n = res.opts.rounds * res.opts.perBlock;
  const table = (pick: (xs: number[]) => number) => mdTable(
    ['context (KV capacity)', 'past tokens per row', 'split step ms', 'fallback (Concat) step ms', 'floor ms', 'split ÷ floor', 'fallback ÷ floor', 'fallback ÷ split'],
    res.rows.map((r) => [
      `${r.ctx} (${r.capacity})`, `${r.pastTokens[0]}–${r.pastTokens[1]}`, fmt(pick(r.split)), fmt(pick(r.fallback)), fmt(pick(r.floor)),
      `**${ratio(pick(r.split), pick(r.floor))}**`, ratio(pick(r.fallback), pick(r.floor)), ratio(pick(r.fallback), pick(r.split)),
    ]),
  );
  return [
    `Split attention on ${res.splitLayers} of ${res.layers} layers (the rewrite's report). Batch ${res.opts.batch}, bare rows, default site plan; ` +
      `medians of ${n} Engine.step() calls each (${res.opts.rounds} rounds × ${res.opts.perBlock}, split, fallback and floor blocks alternating, each after a warm-up). ` +
      'The floor reads a cache of the capacity the graph sees (at 1000 that is the context cap, 1023).',
    '',
    table(median),
    '',
    'Minima:',
    '',
    table(minimum),
  ].join('\n');
}
