/**
 * Bench section 7 (issue 12): prompt learning served as KV prefixes, on the
 * real Engine in-process (default site plan), deltas written in PEFT's format
 * and loaded through the registry.
 *
 * - TTFT: one request of a PROMPT_TUNING task (20 virtual tokens, its prefix
 *   already computed) against a bare request of the same prompt; each is one
 *   Engine.step() (max_new_tokens 1: the prefill that picks the first token).
 *   Alternated request by request, paired ratios.
 * - Decode: 32 rows of PREFIX_TUNING tasks (20 virtual tokens) against the same
 *   32 rows bare and against 32 bare rows with 20 more prompt tokens (the cost
 *   of 20 more cached tokens); each an Engine of its own, prefilled untimed,
 *   then pure decode steps alternated one by one (paired ratios).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type * as ort from 'onnxruntime-node';
import type { Backbone } from '../../src/backbone/backbone.js';
import type { SiteLayout } from '../../src/backbone/rewrite/delta-sites.js';
import { Registry } from '../../src/deltas/registry.js';
import { encodeSafetensors } from '../../src/deltas/safetensors.js';
import type { LoadedDelta } from '../../src/deltas/types.js';
import { Engine } from '../../src/engine/engine.js';
import { writeDelta } from '../../test/helpers/deltas.js';
import { fmt, mdTable, median, minimum, rand } from './common.js';

const B = 32;
const VIRTUAL = 20;
const GREEDY = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null };

export interface PrefixBenchOptions {
  /** TTFT pairs (bare, prompt-tuned) measured. */
  ttftPairs: number;
  /** Real prompt tokens of the TTFT requests. */
  ttftPrompt: number;
  /** Real prompt tokens per row in the decode configurations. */
  decodePrompt: number;
  rounds: number;
  perBlock: number;
  log: (msg: string) => void;
}

export interface PrefixBenchResult {
  ttft: { bare: number[]; prompt: number[]; ratios: number[] };
  /** Per configuration: its step times and each round's ratio to the bare rows' step. */
  decode: { label: string; slots: number; steps: number[]; ratios: number[] }[];
  capacity: number;
  opts: PrefixBenchOptions;
}

async function promptLearningDeltas(bb: Backbone, log: (m: string) => void): Promise<{ prompt: LoadedDelta; prefixes: LoadedDelta[]; remove(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), 'deltaserve-bench-prefix-'));
  const registry = await Registry.open({ dir: join(dir, 'deltas'), backbone: bb.info, cacheBytes: 2 ** 31 });
  const { numLayers: L, hiddenSize: H } = bb.info;
  const { kvHeads: KV, headDim: D } = bb.io;
  const put = async (id: string, config: Record<string, unknown>, shape: number[], seed: number, scale: number) => {
    await registry.register(id, await writeDelta(join(dir, 'upload', id), {
      'adapter_config.json': { peft_type: 'PREFIX_TUNING', task_type: 'CAUSAL_LM', inference_mode: true, num_virtual_tokens: VIRTUAL, num_transformer_submodules: 1, ...config },
      'adapter_model.safetensors': encodeSafetensors({ prompt_embeddings: { dtype: 'F32', shape, data: rand(shape[0] * shape[1], seed, scale) } }),
    }), { replace: false });
    return registry.load(id);
  };
  const prompt = await put('prompt', { peft_type: 'PROMPT_TUNING', token_dim: H }, [VIRTUAL, H], 1, 0.1);
  // 4 distinct prefix-tuned tasks cycled over the 32 rows.
  const prefixes = await Promise.all([0, 1, 2, 3].map((k) => put(`prefix${k}`, { token_dim: KV * D, num_attention_heads: KV, num_layers: L }, [VIRTUAL, L * 2 * KV * D], 10 + k, 1)));
  log(`  prefix: 5 deltas registered`);
  return { prompt, prefixes, remove: () => rm(dir, { recursive: true, force: true }) };
}

export async function measurePrefix(bb: Backbone, session: ort.InferenceSession, sites: SiteLayout[], opts: PrefixBenchOptions): Promise<PrefixBenchResult> {
  const deltas = await promptLearningDeltas(bb, opts.log);
  const newEngine = () => new Engine(session, bb.io, sites, { maxBatch: B, prefillChunkTokens: 4096, eosTokenIds: [], maxPositions: bb.info.maxPositions });
  const promptOf = (n: number, salt: number) => Array.from({ length: n }, (_, t) => 32 + ((t * 7 + salt * 13) % 95));
  try {
    // TTFT: one engine, one request at a time (the KV cache empties between them).
    const engine = newEngine();
    let rowId = 0;
    const first = async (delta: LoadedDelta | null) => {
      engine.add({ rowId: rowId++, promptIds: promptOf(opts.ttftPrompt, 1), sampling: GREEDY, maxNewTokens: 1, delta });
      const t = performance.now();
      const s = await engine.step();
      const ms = performance.now() - t;
      if (s.tokens.length !== 1 || !engine.idle) throw new Error('a TTFT step did not produce exactly the first token');
      return ms;
    };
    await first(deltas.prompt); // computes the prompt's prefix once (the "cached" state), and warms up
    await first(null);
    const ttft = { bare: [] as number[], prompt: [] as number[], ratios: [] as number[] };
    for (let i = 0; i < opts.ttftPairs; i++) {
      const bare = await first(null);
      const tuned = await first(deltas.prompt);
      ttft.bare.push(bare);
      ttft.prompt.push(tuned);
      ttft.ratios.push(tuned / bare);
    }
    opts.log(`  prefix: TTFT ${opts.ttftPairs} pairs`);

    // Decode: three engines, each prefilled untimed.
    const n = opts.decodePrompt;
    const configs = [
      { label: `32 bare rows, ${n}-token prompts`, rows: (r: number) => ({ delta: null, prompt: promptOf(n, r) }), slots: n },
      { label: `32 prefix-tuned rows (${VIRTUAL} virtual tokens, 4 tasks), ${n}-token prompts`, rows: (r: number) => ({ delta: deltas.prefixes[r % 4], prompt: promptOf(n, r) }), slots: n + VIRTUAL },
      { label: `32 bare rows, ${n + VIRTUAL}-token prompts (${VIRTUAL} more cached tokens)`, rows: (r: number) => ({ delta: null, prompt: promptOf(n + VIRTUAL, r) }), slots: n + VIRTUAL },
    ];
    const engines: Engine[] = [];
    for (const c of configs) {
      const e = newEngine();
      for (let r = 0; r < B; r++) {
        const { delta, prompt } = c.rows(r);
        e.add({ rowId: r, promptIds: prompt, sampling: GREEDY, maxNewTokens: 100_000, delta });
      }
      for (let k = 0; ; k++) {
        const s = await e.step();
        if (s.stats.decodeRows === B && s.stats.prefillRows === 0) break;
        if (k > 100) throw new Error(`${c.label}: never reached a decode step of ${B} rows`);
      }
      engines.push(e);
    }
    opts.log(`  prefix: ${configs.length} engines prefilled`);
    const capacity = engines[0].kvCapacity;
    const decode = configs.map((c) => ({ label: c.label, slots: c.slots, steps: [] as number[], ratios: [] as number[] }));
    // Every configuration feeds the same shapes (32 rows, the same KV capacity), so their steps alternate one
    // by one: each round's ratios to the bare rows are paired, and drift on this shared machine cancels.
    const step = async (i: number) => {
      const t = performance.now();
      const s = await engines[i].step();
      const ms = performance.now() - t;
      if (s.stats.decodeRows !== B || s.stats.prefillRows !== 0 || engines[i].kvCapacity !== capacity) {
        throw new Error(`${configs[i].label}: a timed step was not a decode step of ${B} rows at capacity ${capacity}`);
      }
      return ms;
    };
    for (const i of engines.keys()) await step(i); // warm-up
    for (let round = 0; round < opts.rounds * opts.perBlock; round++) {
      // The order rotates round by round, so no configuration always runs right after another.
      const ms: number[] = new Array(engines.length);
      for (let k = 0; k < engines.length; k++) {
        const i = (round + k) % engines.length;
        ms[i] = await step(i);
      }
      ms.forEach((x, i) => {
        decode[i].steps.push(x);
        decode[i].ratios.push(x / ms[0]);
      });
    }
    return { ttft, decode, capacity, opts };
  } finally {
    await deltas.remove();
  }
}

export function prefixGoals(res: PrefixBenchResult): { what: string; measured: string; met: string }[] {
  const r = median(res.ttft.ratios);
  const [, prefixed, longer] = res.decode;
  const paired = median(prefixed.ratios.map((x, i) => x / longer.ratios[i]));
  const yes = (ok: boolean) => (ok ? 'yes' : '**no**');
  return [
    {
      what: `Prompt learning: TTFT of a prompt-tuned request (${VIRTUAL} virtual tokens, prefix cached) ≤ 1.1× a bare request of the same prompt (issue 12)`,
      measured: `paired median ${fmt(r, 2)} (${fmt(median(res.ttft.prompt))} vs ${fmt(median(res.ttft.bare))} ms)`,
      met: yes(r <= 1.1),
    },
    {
      what: `Prompt learning: decode step of 32 rows with ${VIRTUAL}-token prefixes ≤ the same rows bare with ${VIRTUAL} more cached tokens (issue 12)`,
      measured: `paired median ${fmt(paired, 2)} (${fmt(median(prefixed.steps))} vs ${fmt(median(longer.steps))} ms); vs the rows without prefixes ${fmt(median(prefixed.ratios), 2)}`,
      met: `${yes(paired <= 1.0)} (paired median ≤ 1), ${yes(paired <= 1.05)} (within 5 %)`,
    },
  ];
}

export function prefixTables(res: PrefixBenchResult): string {
  const ttft = mdTable(['request', 'TTFT median ms', 'min ms', 'paired ratio (median)'], [
    [`bare, ${res.opts.ttftPrompt}-token prompt`, fmt(median(res.ttft.bare)), fmt(minimum(res.ttft.bare)), '1'],
    [`prompt-tuned (${VIRTUAL} virtual tokens, prefix cached), same prompt`, fmt(median(res.ttft.prompt)), fmt(minimum(res.ttft.prompt)), fmt(median(res.ttft.ratios), 2)],
  ], ['l', 'r', 'r', 'r']);
  const decode = mdTable([`configuration (KV capacity ${res.capacity})`, 'KV slots per row', 'step median ms', 'min ms', '÷ bare (paired median)'], res.decode.map((c) => [
    c.label, c.slots, fmt(median(c.steps)), fmt(minimum(c.steps)), fmt(median(c.ratios), 2),
  ]), ['l', 'r', 'r', 'r', 'r']);
  return `${ttft}\n\n${decode}`;
}
