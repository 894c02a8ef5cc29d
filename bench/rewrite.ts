/**
 * Decode-step cost of the engine-graph rewrite on demo:gpt2-small (GPT-2
 * small's exact shapes), CPU provider. One process, every configuration
 * timed round-robin (so drift hits all alike), medians of N.
 *
 *   npx tsx bench/rewrite.ts [--rounds 5] [--steps 8] [--context 64] [--batches 1,8,32]
 *
 * The model is generated into DELTASERVE_CACHE_DIR (or ~/.cache/deltaserve)
 * on first use (~480 MB).
 */
import * as ort from 'onnxruntime-node';
import { loadBackbone, type Backbone } from '../src/backbone/backbone.js';
import { encodeModel } from '../src/backbone/onnx/proto.js';
import { buildEngineGraph, type SitePlanOptions } from '../src/backbone/rewrite/index.js';
import { createSession } from '../src/backbone/session.js';
import { DeltaBanks } from '../src/engine/banks.js';
import type { LoadedDelta, LoraSite } from '../src/deltas/types.js';

const arg = (name: string, dflt: string) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : dflt;
};
const ROUNDS = Number(arg('rounds', '5'));
const PER_BLOCK = Number(arg('steps', '8'));
const REPS = ROUNDS * PER_BLOCK;
const WARMUP = 1;
const CONTEXT = Number(arg('context', '64'));
const BATCHES = arg('batches', '1,8,32').split(',').map(Number);
const RANK = 16;

function rand(n: number, seed: number, scale: number): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = ((s / 4294967296) * 2 - 1) * scale;
  }
  return out;
}

function lora(bb: Backbone, k: number): LoadedDelta {
  const sites: LoraSite[] = bb.info.modules.filter((m) => m.name.endsWith('.c_attn')).map((m, j) => ({
    kind: 'lora', module: m.name, rank: RANK,
    a: rand(m.inFeatures * RANK, k * 7919 + j, 0.05), b: rand(RANK * m.outFeatures, k * 7919 + j + 1000, 0.05),
  }));
  return { id: `lora-${k}`, version: '1', type: 'lora', format: 'peft', rank: RANK, activation: null, sites, bytes: 0 };
}

const i64 = (v: number[], dims: number[]) => new ort.Tensor('int64', BigInt64Array.from(v.map(BigInt)), dims);

/** Feeds of one decode step: one new token per row over CONTEXT past tokens. */
function stepFeeds(bb: Backbone, B: number): Record<string, ort.Tensor> {
  const { layers, kvHeads, headDim } = bb.io;
  const f: Record<string, ort.Tensor> = {
    input_ids: i64(Array.from({ length: B }, (_, b) => 100 + b), [B, 1]),
    attention_mask: i64(Array(B * (CONTEXT + 1)).fill(1), [B, CONTEXT + 1]),
    position_ids: i64(Array(B).fill(CONTEXT), [B, 1]),
  };
  const n = B * kvHeads * CONTEXT * headDim;
  for (let l = 0; l < layers; l++) {
    for (const kv of ['key', 'value']) {
      f[`past_key_values.${l}.${kv}`] = new ort.Tensor('float32', rand(n, l * 2 + (kv === 'key' ? 0 : 1), 1), [B, kvHeads, CONTEXT, headDim]);
    }
  }
  return f;
}

interface Config {
  label: string;
  session: ort.InferenceSession;
  /** Delta feeds for a batch of B rows, or null when the graph has no sites. */
  feeds: (B: number) => Record<string, ort.Tensor>;
  /** Ratio against this config's label. */
  baseline?: string;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

async function main() {
  const t0 = Date.now();
  const bb = await loadBackbone({ model: 'demo:gpt2-small' });
  console.error(`loaded ${bb.info.name} in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  const deltas = Array.from({ length: 32 }, (_, k) => lora(bb, k));

  const plans: Record<string, SitePlanOptions> = {
    'engine, default plan (lora+adapter+bias on all 48 linears)': {},
    'engine, lora all / adapter attn.c_proj+mlp.c_proj / bias all': { lora: 'all', adapter: ['attn.c_proj', 'mlp.c_proj'], bias: 'all' },
    'engine, lora all / no adapter / no bias': { lora: 'all', adapter: [], bias: [] },
    'engine, lora c_attn only': { lora: ['c_attn'], adapter: [], bias: [] },
  };

  const configs: Config[] = [];
  const mk = async (bytes: Uint8Array) => {
    const t = Date.now();
    const s = await createSession(bytes);
    console.error(`  session in ${((Date.now() - t) / 1000).toFixed(1)} s`);
    return s;
  };
  configs.push({ label: '(a) original graph (returns present = concat)', session: await mk(encodeModel(bb.source.model)), feeds: () => ({}) });
  configs.push({ label: "(a') engine, no sites", session: await mk(buildEngineGraph(bb, { lora: [], adapter: [], bias: [] }).bytes), feeds: () => ({}) });
  for (const [name, plan] of Object.entries(plans)) {
    const g = buildEngineGraph(bb, plan);
    const session = await mk(g.bytes);
    const withK = (k: number) => (B: number) => {
      const banks = new DeltaBanks(g.sites);
      for (let r = 0; r < B; r++) banks.setRow(r, k === 0 ? null : deltas[r % k]);
      return banks.feeds(B);
    };
    configs.push({ label: `${name}: no deltas`, session, feeds: withK(0) });
    configs.push({ label: `${name}: 8 distinct r16 LoRAs on c_attn`, session, feeds: withK(8) });
    configs.push({ label: `${name}: 32 distinct r16 LoRAs on c_attn`, session, feeds: withK(32) });
  }

  const results = new Map<string, Map<number, number>>();
  const minima = new Map<string, Map<number, number>>();
  for (const B of BATCHES) {
    const base = stepFeeds(bb, B);
    // Banks are built once per batch composition, outside the timed step, as the engine does.
    const feeds = configs.map((c) => ({ ...base, ...c.feeds(B) }));
    const times = configs.map(() => [] as number[]);
    // Steady state: a block of consecutive steps of one configuration (same shapes, as
    // the engine runs between batch changes), blocks round-robin over ROUNDS so drift
    // hits every configuration alike. Alternating shapes step by step within one
    // session costs ORT a re-plan per run and would distort the figures.
    for (let round = 0; round < ROUNDS; round++) {
      for (let i = 0; i < configs.length; i++) {
        for (let rep = 0; rep < WARMUP + PER_BLOCK; rep++) {
          const t = process.hrtime.bigint();
          await configs[i].session.run(feeds[i]);
          const ms = Number(process.hrtime.bigint() - t) / 1e6;
          if (rep >= WARMUP) times[i].push(ms);
        }
      }
    }
    configs.forEach((c, i) => {
      if (!results.has(c.label)) results.set(c.label, new Map());
      results.get(c.label)!.set(B, median(times[i]));
      if (!minima.has(c.label)) minima.set(c.label, new Map());
      minima.get(c.label)!.set(B, Math.min(...times[i]));
    });
    console.error(`batch ${B} done (${((Date.now() - t0) / 1000).toFixed(0)} s)`);
  }

  const table = (what: string, res: Map<string, Map<number, number>>) => {
    const a = res.get(configs[0].label)!;
    const a2 = res.get(configs[1].label)!;
    console.log(`\n${what}: demo:gpt2-small decode step, context ${CONTEXT}, CPU provider, onnxruntime-node ${ort.env.versions?.common ?? ''}, ${REPS} steps per configuration (${ROUNDS} rounds × ${PER_BLOCK} consecutive steps, each block after ${WARMUP} warm-up step)\n`);
    console.log(`| configuration | ${BATCHES.map((B) => `B=${B} ms | ×(a) | ×(a')`).join(' | ')} |`);
    console.log(`| --- | ${BATCHES.map(() => '---: | ---: | ---:').join(' | ')} |`);
    for (const [label, byB] of res) {
      const cells = BATCHES.map((B) => {
        const ms = byB.get(B)!;
        return `${ms.toFixed(1)} | ${(ms / a.get(B)!).toFixed(2)} | ${(ms / a2.get(B)!).toFixed(2)}`;
      });
      console.log(`| ${label} | ${cells.join(' | ')} |`);
    }
  };
  table('Medians', results);
  table('Minima (the least disturbed step; this VM is noisy)', minima);
  console.log(`\n(LoRA rows hold min(B, K) distinct deltas: at B=1 one LoRA, at B=8 eight.) Total ${((Date.now() - t0) / 1000).toFixed(0)} s.`);
}

await main();
