/**
 * Decode-step cost of the engine-graph rewrite (issue 3), factored out of
 * bench/rewrite.ts so `npm run bench` runs the same measurement.
 *
 * One process, every configuration timed in blocks of consecutive same-shape
 * steps (as the engine runs between batch changes), blocks round-robin over
 * `rounds` so drift hits all alike; medians and minima per configuration.
 */
import * as ort from 'onnxruntime-node';
import type { Backbone } from '../../src/backbone/backbone.js';
import { encodeModel } from '../../src/backbone/onnx/proto.js';
import { buildEngineGraph } from '../../src/backbone/rewrite/index.js';
import { planSites, type SitePlan } from '../../src/deltas/kinds/index.js';
import { LOGPROBS_ON } from '../../src/backbone/rewrite/logprobs.js';
import { noPromptEmbeds, PROMPT_EMBEDS } from '../../src/backbone/rewrite/prompt-embeds.js';
import { createSession } from '../../src/backbone/session.js';
import { DeltaBanks } from '../../src/engine/banks.js';
import type { LoadedDelta } from '../../src/deltas/types.js';
import { i64, median, minimum, rand, syntheticCAttnLora } from './common.js';

export interface RewriteBenchOptions {
  rounds: number;
  /** Consecutive steps per block (after `warmup` untimed ones). */
  perBlock: number;
  warmup?: number;
  context: number;
  batches: number[];
  /** Site plans of the engine graph, by label; each gets rows with no deltas, 8 and 32 distinct r16 LoRAs on c_attn. */
  plans: Record<string, SitePlan>;
  log?: (msg: string) => void;
  /** Sessions already made elsewhere in the run, reused instead of building them again. */
  sessions?: { original?: ort.InferenceSession; noSites?: ort.InferenceSession; byPlan?: Map<string, ort.InferenceSession> };
}

export interface RewriteConfigResult {
  label: string;
  /** The plan's label, or null for the two baselines. */
  plan: string | null;
  /** Distinct LoRAs asked for (0 = none); a batch of B rows holds min(B, k). */
  loras: number;
  median: Map<number, number>;
  min: Map<number, number>;
}

export interface RewriteBenchResult {
  opts: RewriteBenchOptions;
  configs: RewriteConfigResult[];
  ortVersion: string;
  /** Sessions made here (for a caller that reuses or releases them). */
  sessions: { original: ort.InferenceSession; noSites: ort.InferenceSession; byPlan: Map<string, ort.InferenceSession> };
  seconds: number;
}

export const ORIGINAL_LABEL = '(a) original graph (returns present = concat)';
export const NO_SITES_LABEL = "(a') engine, no sites";

/** Feeds of one decode step: one new token per row over `context` past tokens. */
export function stepFeeds(bb: Backbone, B: number, context: number): Record<string, ort.Tensor> {
  const { layers, kvHeads, headDim } = bb.io;
  const f: Record<string, ort.Tensor> = {
    input_ids: i64(Array.from({ length: B }, (_, b) => 100 + b), [B, 1]),
    attention_mask: i64(Array(B * (context + 1)).fill(1), [B, context + 1]),
    position_ids: i64(Array(B).fill(context), [B, 1]),
    // Steps in this benchmark ask for no logprobs and have no virtual tokens (the original graph ignores the extra feeds).
    [LOGPROBS_ON]: new ort.Tensor('bool', [false], []),
    [PROMPT_EMBEDS]: noPromptEmbeds(),
  };
  const n = B * kvHeads * context * headDim;
  for (let l = 0; l < layers; l++) {
    for (const kv of ['key', 'value']) {
      f[`past_key_values.${l}.${kv}`] = new ort.Tensor('float32', rand(n, l * 2 + (kv === 'key' ? 0 : 1), 1), [B, kvHeads, context, headDim]);
    }
  }
  return f;
}

interface Config {
  label: string;
  plan: string | null;
  loras: number;
  session: ort.InferenceSession;
  /** Delta feeds for a batch of B rows (empty when the graph has no sites). */
  feeds: (B: number) => Record<string, ort.Tensor>;
}

export async function measureRewrite(bb: Backbone, opts: RewriteBenchOptions): Promise<RewriteBenchResult> {
  const t0 = Date.now();
  const log = opts.log ?? (() => {});
  const warmup = opts.warmup ?? 1;
  const deltas: LoadedDelta[] = Array.from({ length: 32 }, (_, k) => syntheticCAttnLora(bb, k));
  const mk = async (what: string, bytes: () => Uint8Array) => {
    const t = Date.now();
    const s = await createSession(bytes());
    log(`  session ${what} in ${((Date.now() - t) / 1000).toFixed(1)} s`);
    return s;
  };
  const original = opts.sessions?.original ?? (await mk('original', () => encodeModel(bb.source.model)));
  const noSites = opts.sessions?.noSites ?? (await mk('engine, no sites', () => buildEngineGraph(bb, new Map()).bytes));
  const configs: Config[] = [
    { label: ORIGINAL_LABEL, plan: null, loras: 0, session: original, feeds: () => ({}) },
    { label: NO_SITES_LABEL, plan: null, loras: 0, session: noSites, feeds: () => ({}) },
  ];
  const byPlan = new Map<string, ort.InferenceSession>();
  for (const [name, plan] of Object.entries(opts.plans)) {
    const g = buildEngineGraph(bb, planSites(bb, plan));
    const session = opts.sessions?.byPlan?.get(name) ?? (await mk(name, () => g.bytes));
    byPlan.set(name, session);
    const withK = (k: number) => (B: number) => {
      const banks = new DeltaBanks(g.sites, { maxRows: B, zeroSize: true });
      for (let r = 0; r < B; r++) banks.add(k === 0 ? null : deltas[r % k]);
      return banks.feeds();
    };
    configs.push({ label: `${name}: no deltas`, plan: name, loras: 0, session, feeds: withK(0) });
    configs.push({ label: `${name}: 8 distinct r16 LoRAs on c_attn`, plan: name, loras: 8, session, feeds: withK(8) });
    configs.push({ label: `${name}: 32 distinct r16 LoRAs on c_attn`, plan: name, loras: 32, session, feeds: withK(32) });
  }

  const results = configs.map((c) => ({ label: c.label, plan: c.plan, loras: c.loras, median: new Map<number, number>(), min: new Map<number, number>() }));
  for (const B of opts.batches) {
    const base = stepFeeds(bb, B, opts.context);
    // Banks are built once per batch composition, outside the timed step, as the engine does.
    const feeds = configs.map((c) => ({ ...base, ...c.feeds(B) }));
    const times = configs.map(() => [] as number[]);
    // Steady state: a block of consecutive steps of one configuration (same shapes, as
    // the engine runs between batch changes), blocks round-robin over the rounds so drift
    // hits every configuration alike. Alternating shapes step by step within one
    // session costs ORT a re-plan per run and would distort the figures.
    for (let round = 0; round < opts.rounds; round++) {
      for (let i = 0; i < configs.length; i++) {
        for (let rep = 0; rep < warmup + opts.perBlock; rep++) {
          const t = process.hrtime.bigint();
          await configs[i].session.run(feeds[i]);
          const ms = Number(process.hrtime.bigint() - t) / 1e6;
          if (rep >= warmup) times[i].push(ms);
        }
      }
    }
    results.forEach((r, i) => {
      r.median.set(B, median(times[i]));
      r.min.set(B, minimum(times[i]));
    });
    log(`  rewrite: batch ${B} done (${((Date.now() - t0) / 1000).toFixed(0)} s)`);
  }
  return {
    opts, configs: results, ortVersion: ort.env.versions?.common ?? '',
    sessions: { original, noSites, byPlan }, seconds: (Date.now() - t0) / 1000,
  };
}

/** The two tables bench/rewrite.ts has always printed (medians, then minima), as text. */
export function rewriteTables(res: RewriteBenchResult): string {
  const { opts } = res;
  const warmup = opts.warmup ?? 1;
  const reps = opts.rounds * opts.perBlock;
  const out: string[] = [];
  const table = (what: string, pick: (c: RewriteConfigResult) => Map<number, number>) => {
    const a = pick(res.configs[0]);
    const a2 = pick(res.configs[1]);
    out.push(`\n${what}: demo:gpt2-small decode step, context ${opts.context}, CPU provider, onnxruntime-node ${res.ortVersion}, ${reps} steps per configuration (${opts.rounds} rounds × ${opts.perBlock} consecutive steps, each block after ${warmup} warm-up step)\n`);
    out.push(`| configuration | ${opts.batches.map((B) => `B=${B} ms | ×(a) | ×(a')`).join(' | ')} |`);
    out.push(`| --- | ${opts.batches.map(() => '---: | ---: | ---:').join(' | ')} |`);
    for (const c of res.configs) {
      const byB = pick(c);
      const cells = opts.batches.map((B) => {
        const ms = byB.get(B)!;
        return `${ms.toFixed(1)} | ${(ms / a.get(B)!).toFixed(2)} | ${(ms / a2.get(B)!).toFixed(2)}`;
      });
      out.push(`| ${c.label} | ${cells.join(' | ')} |`);
    }
  };
  table('Medians', (c) => c.median);
  table('Minima (the least disturbed step; this VM is noisy)', (c) => c.min);
  return out.join('\n');
}
