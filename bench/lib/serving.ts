/**
 * Issue 5, throughput and the naive baseline, on the real serving stack:
 * startServices (real delta store on disk, real registry, real ORT session in
 * the real engine worker thread, real scheduler, real express app).
 *
 * - 32 concurrent streams: all on the bare backbone vs spread over 32
 *   distinct rank-16 PEFT LoRAs on c_attn (registered as real files), with
 *   GET /healthz probed over a listening socket while the engine is saturated.
 * - The same requests one at a time through deltaserve (batch 1).
 * - The naive way: per request, load the delta, merge it into the backbone's
 *   ONNX initializers (W += a·b), create an ORT session on the merged model,
 *   generate with the plain KV-cache loop at batch 1 (present fed back as
 *   past), then restore the weights and drop the session.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import type { Backbone } from '../../src/backbone/backbone.js';
import { attrInt, dimsOf, encodeModel } from '../../src/backbone/onnx/proto.js';
import { createSession } from '../../src/backbone/session.js';
import { loadConfig } from '../../src/config.js';
import { encodeSafetensors, type TensorToWrite } from '../../src/deltas/safetensors.js';
import type { DeltaSite } from '../../src/deltas/types.js';
import type { StepResult } from '../../src/engine/protocol.js';
import type { FinishReason, SamplingParams } from '../../src/engine/types.js';
import { createLogger } from '../../src/log.js';
import { startServices, type Services } from '../../src/server.js';
import { fmt, i64, maximum, median, mdTable, percentile, rand, ratio, sleep } from './common.js';

export const LORA_RANK = 16;

export interface BenchRequest {
  i: number;
  /** The task of the mixed runs (one distinct LoRA per request). */
  task: string;
  prompt: string;
}

export interface BenchStack {
  services: Services;
  scratch: string;
  url: string;
  server: Server;
  close(): Promise<void>;
}

const taskId = (k: number) => `bench-lora-${String(k).padStart(2, '0')}`;

/** A PEFT LoRA as a user brings it: adapter_config.json + adapter_model.safetensors, rank 16 on c_attn. */
function peftLoraFiles(bb: Backbone, k: number): Record<string, string | Uint8Array> {
  const tensors: Record<string, TensorToWrite> = {};
  const mods = bb.info.modules.filter((m) => m.name.endsWith('.c_attn'));
  mods.forEach((m, j) => {
    const seed = 1_000_003 * (k + 1) + 97 * j;
    tensors[`base_model.model.${m.name}.lora_A.weight`] = { dtype: 'F32', shape: [LORA_RANK, m.inFeatures], data: rand(LORA_RANK * m.inFeatures, seed, 1 / Math.sqrt(m.inFeatures)) };
    tensors[`base_model.model.${m.name}.lora_B.weight`] = { dtype: 'F32', shape: [m.outFeatures, LORA_RANK], data: rand(m.outFeatures * LORA_RANK, seed + 1, 0.2) };
  });
  const config = {
    peft_type: 'LORA', task_type: 'CAUSAL_LM', r: LORA_RANK, lora_alpha: 2 * LORA_RANK, target_modules: ['c_attn'],
    bias: 'none', fan_in_fan_out: true,
  };
  return { 'adapter_config.json': JSON.stringify(config, null, 2), 'adapter_model.safetensors': encodeSafetensors(tensors) };
}

export async function startBenchStack(opts: { model: string; cacheDir: string; loras: number; log: (m: string) => void }): Promise<BenchStack> {
  const scratch = await mkdtemp(join(tmpdir(), 'deltaserve-bench-'));
  const config = loadConfig({ DELTASERVE_MODEL: opts.model, DELTASERVE_DELTAS_DIR: join(scratch, 'deltas'), LOG_LEVEL: 'silent' });
  let t = Date.now();
  const services = await startServices({ config, logger: createLogger('silent'), cacheDir: opts.cacheDir, defaultMetrics: false });
  opts.log(`  serving: services ready (worker + session + warm-up) in ${((Date.now() - t) / 1000).toFixed(1)} s`);
  t = Date.now();
  for (let k = 0; k < opts.loras; k++) {
    const dir = join(scratch, 'uploads', taskId(k));
    await mkdir(dir, { recursive: true });
    const files = [];
    for (const [name, content] of Object.entries(peftLoraFiles(services.backbone, k))) {
      await writeFile(join(dir, name), content);
      files.push({ name, path: join(dir, name) });
    }
    await services.registry.register(taskId(k), files, { replace: false });
  }
  opts.log(`  serving: ${opts.loras} PEFT LoRAs registered in ${((Date.now() - t) / 1000).toFixed(1)} s`);
  const server = createServer(services.app);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return {
    services, scratch, url, server,
    close: async () => {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await services.close();
      await rm(scratch, { recursive: true, force: true });
    },
  };
}

/** `n` requests with prompts of exactly `promptTokens` tokens (the demo tokenizer is byte-level). */
export function benchRequests(stack: BenchStack, n: number, promptTokens: number): BenchRequest[] {
  const words = ['the', 'river', 'carries', 'light', 'over', 'stones', 'while', 'a', 'heron', 'waits', 'by', 'reeds', 'and', 'wind'];
  return Array.from({ length: n }, (_, i) => {
    let prompt = `Story ${i}:`;
    for (let w = i; prompt.length < promptTokens + 12; w += 3) prompt += ` ${words[w % words.length]}`;
    // Trim to exactly promptTokens tokens.
    const tok = stack.services.backbone.tokenizer;
    while (tok.encode(prompt, { addSpecialTokens: true }).length > promptTokens) prompt = prompt.slice(0, -1);
    return { i, task: taskId(i % 32), prompt };
  });
}

export const greedy = (maxNewTokens: number): SamplingParams => ({
  maxNewTokens, temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null, stop: [],
});

export interface RunResult {
  label: string;
  wallMs: number;
  tokens: number;
  requests: number;
  finish: Partial<Record<FinishReason, number>>;
  ttftMs: number[];
  /** Session.run of decode-only steps with every row decoding, as the worker reported it. */
  fullDecodeMs: number[];
  maxRows: number;
  /** Each prefill run: rows in it and its session.run ms. */
  prefills: { rows: number; tokens: number; ms: number }[];
  /** Generated ids per request index. */
  outputs: Map<number, number[]>;
}

const tokensPerSecond = (r: { tokens: number; wallMs: number }) => r.tokens / (r.wallMs / 1000);

/** All requests at once (or one at a time with `sequential`), through the real scheduler. */
async function runRequests(
  stack: BenchStack, label: string, reqs: BenchRequest[], mixed: boolean, maxNew: number, sequential = false,
): Promise<RunResult> {
  const res: RunResult = { label, wallMs: 0, tokens: 0, requests: reqs.length, finish: {}, ttftMs: [], fullDecodeMs: [], maxRows: 0, prefills: [], outputs: new Map() };
  const onStep = (s: StepResult) => {
    res.maxRows = Math.max(res.maxRows, s.stats.decodeRows + s.stats.prefillRows);
    if (s.stats.prefillRows) res.prefills.push({ rows: s.stats.prefillRows, tokens: s.stats.prefillTokens, ms: s.stats.prefillMs });
    if (s.stats.prefillRows === 0 && s.stats.decodeRows === (sequential ? 1 : reqs.length)) res.fullDecodeMs.push(s.stats.decodeMs);
  };
  stack.services.engine.on('step', onStep);
  const t0 = performance.now();
  const one = async (r: BenchRequest) => {
    const ids: number[] = [];
    const start = performance.now();
    const out = await stack.services.scheduler.generate({ task: mixed ? r.task : null, prompt: r.prompt, params: greedy(maxNew) }, (t) => {
      if (!ids.length) res.ttftMs.push(performance.now() - start);
      ids.push(t.id);
    });
    res.tokens += out.generatedTokens;
    res.finish[out.finishReason] = (res.finish[out.finishReason] ?? 0) + 1;
    res.outputs.set(r.i, ids);
  };
  if (sequential) for (const r of reqs) await one(r);
  else await Promise.all(reqs.map(one));
  res.wallMs = performance.now() - t0;
  stack.services.engine.off('step', onStep);
  return res;
}

export interface ThroughputResult {
  bare: RunResult[];
  mixed: RunResult[];
  health: number[];
  healthErrors: number;
  maxNew: number;
  promptTokens: number;
}

/** Bare and mixed rounds alternate, so drift on this shared VM hits both alike. */
export async function measureThroughput(
  stack: BenchStack, reqs: BenchRequest[], opts: { reps: number; maxNew: number; promptTokens: number; log: (m: string) => void },
): Promise<ThroughputResult> {
  // Warm-up: every delta loaded into the cache once, ORT's kernels warm for rank 0 and rank 16 banks.
  await runRequests(stack, 'warm-up', reqs, true, 4);
  await runRequests(stack, 'warm-up', reqs, false, 4);
  const out: ThroughputResult = { bare: [], mixed: [], health: [], healthErrors: 0, maxNew: opts.maxNew, promptTokens: opts.promptTokens };
  for (let rep = 0; rep < opts.reps; rep++) {
    for (const mixed of rep % 2 === 0 ? [false, true] : [true, false]) {
      let probing = true;
      const probe = (async () => {
        await sleep(200); // let the batch fill first
        while (probing) {
          const t = performance.now();
          try {
            const r = await fetch(`${stack.url}/healthz`);
            await r.text();
            if (r.status === 200) out.health.push(performance.now() - t);
            else out.healthErrors++;
          } catch {
            out.healthErrors++;
          }
          await sleep(25);
        }
      })();
      const r = await runRequests(stack, mixed ? 'mixed' : 'bare', reqs, mixed, opts.maxNew);
      probing = false;
      await probe;
      (mixed ? out.mixed : out.bare).push(r);
      opts.log(`  throughput rep ${rep + 1}/${opts.reps} ${r.label}: ${r.tokens} tokens in ${(r.wallMs / 1000).toFixed(1)} s = ${fmt(tokensPerSecond(r))} tok/s`);
    }
  }
  return out;
}

export async function measureSequential(stack: BenchStack, reqs: BenchRequest[], maxNew: number): Promise<RunResult> {
  return runRequests(stack, 'sequential', reqs, true, maxNew, true);
}

// ---------------------------------------------------------------------------
// The naive way.

export interface NaiveRequestTiming {
  i: number;
  tokens: number;
  loadMergeMs: number;
  encodeMs: number;
  sessionMs: number;
  generateMs: number;
  detachMs: number;
  totalMs: number;
  /** Equal, token for token, to deltaserve's batched output for the same request and task. */
  sameAsDeltaserve: boolean | null;
}

export interface NaiveResult {
  measured: NaiveRequestTiming[];
  of: number;
}

/** W += a·b for every LoRA site, in the backbone's own initializers; returns a restore function. */
export function attachMerged(bb: Backbone, sites: DeltaSite[]): () => void {
  const graph = bb.source.model.graph!;
  const inits = new Map((graph.initializer ?? []).map((t) => [t.name!, t]));
  const restore: (() => void)[] = [];
  for (const site of sites) {
    const lin = bb.linear.find((m) => m.name === site.module);
    if (!lin) throw new Error(`naive merge: no module ${site.module}`);
    const t = inits.get(lin.node.input![1])!;
    const [d0, d1] = dimsOf(t);
    const transB = lin.node.opType === 'Gemm' && attrInt(lin.node, 'transB') === 1;
    // A copy of the weight's bytes. Not src's floatData(): for an initializer whose rawData is an
    // unaligned Node Buffer it reads from the start of the whole file (Buffer#slice does not copy).
    const W = new Float32Array(Uint8Array.prototype.slice.call(t.rawData!).buffer);
    const R = site.axes.rank;
    const { lora_a: a, lora_b: b } = site.data;
    const inF = lin.inFeatures;
    const outF = lin.outFeatures;
    if ((transB ? d0 : d1) !== outF || (transB ? d1 : d0) !== inF) throw new Error(`naive merge: ${site.module} weight is ${d0}x${d1}`);
    for (let i = 0; i < inF; i++) {
      for (let k = 0; k < R; k++) {
        const aik = a[i * R + k];
        if (aik === 0) continue;
        const bRow = k * outF;
        if (!transB) {
          const wRow = i * outF;
          for (let o = 0; o < outF; o++) W[wRow + o] += aik * b[bRow + o];
        } else {
          for (let o = 0; o < outF; o++) W[o * inF + i] += aik * b[bRow + o];
        }
      }
    }
    const original = t.rawData;
    t.rawData = new Uint8Array(W.buffer);
    restore.push(() => {
      t.rawData = original;
    });
  }
  return () => restore.forEach((r) => r());
}

/** The plain KV-cache loop at batch 1 on an Optimum-layout graph: present fed back as past. */
export async function plainGenerate(session: ort.InferenceSession, bb: Backbone, promptIds: number[], maxNew: number): Promise<number[]> {
  const { layers, kvHeads, headDim, vocabSize } = bb.io;
  const eos = new Set(bb.tokenizer.eosTokenIds);
  const out: number[] = [];
  let past: Record<string, ort.Tensor> = {};
  for (let l = 0; l < layers; l++) {
    for (const kv of ['key', 'value']) past[`past_key_values.${l}.${kv}`] = new ort.Tensor('float32', new Float32Array(0), [1, kvHeads, 0, headDim]);
  }
  let ids = promptIds;
  let pos = 0;
  const maxTotal = bb.info.maxPositions;
  for (;;) {
    const S = ids.length;
    const res = await session.run({
      input_ids: i64(ids, [1, S]),
      attention_mask: i64(new Array(pos + S).fill(1), [1, pos + S]),
      position_ids: i64(Array.from({ length: S }, (_, j) => pos + j), [1, S]),
      ...past,
    });
    const logits = res.logits.data as Float32Array;
    const off = (S - 1) * vocabSize;
    let best = 0;
    for (let v = 1; v < vocabSize; v++) if (logits[off + v] > logits[off + best]) best = v;
    out.push(best);
    pos += S;
    if (eos.has(best) || out.length >= maxNew || pos + 1 >= maxTotal) return out;
    past = {};
    for (let l = 0; l < layers; l++) {
      for (const kv of ['key', 'value']) past[`past_key_values.${l}.${kv}`] = res[`present.${l}.${kv}`];
    }
    ids = [best];
  }
}

export async function measureNaive(
  stack: BenchStack, reqs: BenchRequest[], opts: { n: number; maxNew: number; reference: Map<number, number[]> | null; log: (m: string) => void },
): Promise<NaiveResult> {
  const bb = stack.services.backbone;
  const measured: NaiveRequestTiming[] = [];
  for (const r of reqs.slice(0, opts.n)) {
    const t0 = performance.now();
    const delta = await stack.services.registry.load(r.task);
    const sites = delta.sites.filter((s) => s.site === 'lora');
    const detach = attachMerged(bb, sites);
    const t1 = performance.now();
    let bytes: Uint8Array | null = encodeModel(bb.source.model);
    const t2 = performance.now();
    const session = await createSession(bytes);
    bytes = null;
    const t3 = performance.now();
    const promptIds = bb.tokenizer.encode(r.prompt, { addSpecialTokens: true });
    const ids = await plainGenerate(session, bb, promptIds, opts.maxNew);
    const t4 = performance.now();
    detach();
    await session.release();
    const t5 = performance.now();
    const ref = opts.reference?.get(r.i);
    measured.push({
      i: r.i, tokens: ids.length, loadMergeMs: t1 - t0, encodeMs: t2 - t1, sessionMs: t3 - t2, generateMs: t4 - t3, detachMs: t5 - t4,
      totalMs: t5 - t0, sameAsDeltaserve: ref ? ref.length === ids.length && ref.every((x, j) => x === ids[j]) : null,
    });
    opts.log(`  naive request ${r.i} (${r.task}): ${ids.length} tokens in ${((t5 - t0) / 1000).toFixed(1)} s (session ${((t3 - t2) / 1000).toFixed(1)} s, generate ${((t4 - t3) / 1000).toFixed(1)} s)`);
  }
  return { measured, of: reqs.length };
}

// ---------------------------------------------------------------------------
// Tables.

export function throughputTable(tp: ThroughputResult): string {
  const row = (label: string, runs: RunResult[]) => {
    const tps = runs.map(tokensPerSecond);
    const finish = Object.entries(runs.at(-1)!.finish).map(([k, v]) => `${v} ${k}`).join(', ');
    return [
      label, runs.length, fmt(median(tps)), fmt(maximum(tps)), fmt(median(runs.map((r) => r.wallMs / 1000)), 2),
      runs.at(-1)!.tokens, finish, fmt(median(runs.flatMap((r) => r.fullDecodeMs))), fmt(median(runs.flatMap((r) => r.ttftMs)), 0),
      runs.at(-1)!.prefills.map((p) => `${p.rows} (${fmt(p.ms, 0)})`).join(', '),
    ];
  };
  const bareTps = tp.bare.map(tokensPerSecond);
  const mixedTps = tp.mixed.map(tokensPerSecond);
  const n = tp.bare[0]?.requests ?? 0;
  return [
    mdTable(
      ['32 concurrent streams', 'runs', 'tokens/s (median)', 'tokens/s (best)', 'wall s (median)', 'tokens per run', 'finish reasons', 'decode step ms at full batch (worker, median)', 'TTFT ms (median)', 'prefill runs of the last run: rows (ms)'],
      [row('all on the bare backbone', tp.bare), row(`spread over ${n} distinct r${LORA_RANK} LoRAs on c_attn`, tp.mixed)],
    ),
    '',
    `Mixed ÷ bare tokens/s: **${ratio(median(mixedTps), median(bareTps))}** (medians), ${ratio(maximum(mixedTps), maximum(bareTps))} (best runs). ` +
      `${n} requests × prompt ${tp.promptTokens} tokens, max_new_tokens ${tp.maxNew}, greedy; bare and mixed rounds alternate; one warm-up round of each (max_new_tokens 4) first, so every LoRA is in the delta cache.`,
  ].join('\n');
}

export function healthTable(tp: ThroughputResult): string {
  return mdTable(
    ['GET /healthz while saturated', 'probes', 'median ms', 'p99 ms', 'max ms', 'non-200 or failed'],
    [['listening express app, during the timed 32-stream runs', tp.health.length, fmt(median(tp.health), 2), fmt(percentile(tp.health, 99), 2), fmt(maximum(tp.health), 2), tp.healthErrors]],
  );
}

export function naiveTable(tp: ThroughputResult | null, seq: RunResult | null, naive: NaiveResult | null, total: number): string {
  const rows: (string | number)[][] = [];
  const best = tp ? median(tp.mixed.map(tokensPerSecond)) : NaN;
  const per32 = (ms: number, n: number) => (ms / n) * total;
  if (tp) {
    rows.push([`deltaserve, ${total} concurrent, ${total} distinct LoRAs (median run above)`, `${total} of ${total}`, median(tp.mixed.map((x) => x.tokens)), fmt(median(tp.mixed.map((x) => x.wallMs / 1000)), 1), '—', fmt(best), '1.00']);
  }
  if (seq) {
    const tps = tokensPerSecond(seq);
    const extrapolated = seq.requests < total;
    rows.push([
      'deltaserve engine, sequential, batch 1 (one request at a time, each with its LoRA)', `${seq.requests} of ${total}`, seq.tokens, fmt(seq.wallMs / 1000, 1),
      extrapolated ? `${fmt(per32(seq.wallMs, seq.requests) / 1000, 1)} (extrapolated)` : '—', fmt(tps), `**${ratio(best, tps)}**`,
    ]);
  }
  if (naive && naive.measured.length) {
    const ms = naive.measured.reduce((a, m) => a + m.totalMs, 0);
    const tokens = naive.measured.reduce((a, m) => a + m.tokens, 0);
    const tps = tokens / (ms / 1000);
    rows.push([
      'naive: per request load + merge W += a·b + new ORT session + plain KV loop at batch 1 + restore', `${naive.measured.length} of ${total}`, tokens, fmt(ms / 1000, 1),
      naive.measured.length < total ? `${fmt(per32(ms, naive.measured.length) / 1000, 1)} (extrapolated)` : '—', fmt(tps), `**${ratio(best, tps)}**`,
    ]);
  }
  const main = mdTable(['way of serving the same requests', 'requests measured', 'tokens', 'wall s (measured)', `wall s for all ${total}`, 'tokens/s', 'deltaserve ÷ this'], rows);
  if (!naive?.measured.length) return main;
  const m = naive.measured;
  const avg = (f: (x: NaiveRequestTiming) => number) => fmt(m.reduce((a, x) => a + f(x), 0) / m.length / 1000, 2);
  const same = m.filter((x) => x.sameAsDeltaserve === true).length;
  const checked = m.filter((x) => x.sameAsDeltaserve !== null).length;
  return [
    main,
    '',
    mdTable(
      ['naive, mean per request (s)', 'load + merge', 'encode model', 'create session', 'generate', 'restore + release', 'total', 'output equals deltaserve\'s batched output'],
      [[`${m.length} requests`, avg((x) => x.loadMergeMs), avg((x) => x.encodeMs), avg((x) => x.sessionMs), avg((x) => x.generateMs), avg((x) => x.detachMs), avg((x) => x.totalMs), `${same} of ${checked}`]],
    ),
  ].join('\n');
}

export { tokensPerSecond };
