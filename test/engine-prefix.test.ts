/**
 * Prompt learning served as per-row KV prefixes: PEFT's PREFIX_TUNING,
 * PROMPT_TUNING and P_TUNING and OpenDelta's prefix and soft_prompt, written
 * as files and registered, then served greedily by the real Engine (real ORT
 * on the rewritten graph), alone and all mixed in one batch with LoRA,
 * bottleneck-adapter and bare rows. Every row's tokens equal an independent
 * reference built from the ORIGINAL exported graph, one full forward each:
 * - prefix tuning: the file's tensor laid out by PEFT's get_prompt rule (here,
 *   not by deltaserve's parser) and fed as past_key_values, with PEFT's
 *   semantics: attention mask ones over the virtual tokens, real positions
 *   from num_virtual_tokens;
 * - prompt tuning / P-tuning / soft prompt: the original graph's embedding
 *   table extended with the virtual tokens' rows, run over
 *   [virtual ids, prompt, generated] from position 0 (PEFT's
 *   `cat(prompts, inputs_embeds)`).
 * demo:llama has grouped-query attention (2 K/V heads for 4 query heads), so
 * the prefix has PEFT's K/V width there.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import type { Backbone } from '../src/backbone/backbone.js';
import { decodeModel, encodeModel, floatData, floatTensor } from '../src/backbone/onnx/proto.js';
import { createSession } from '../src/backbone/session.js';
import { encodeSafetensors } from '../src/deltas/safetensors.js';
import { Registry } from '../src/deltas/registry.js';
import type { LoadedDelta } from '../src/deltas/types.js';
import { Engine } from '../src/engine/engine.js';
import { ServeError } from '../src/errors.js';
import { PEFT_BASE_CONFIG, randomFloats, writeDelta } from './helpers/deltas.js';
import { generate, params, startStack } from './helpers/engine-stack.js';
import { at, demo, loadCases, emptyCache, FAMILIES, runOriginal, testCacheDir, tokens, defaultGraph, type KvCache, type Session } from './helpers/engine-graph.js';

const GREEDY = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null };
const NEW_TOKENS = 6;

/** A prompt-learning delta as the test wrote it, with what the reference needs. */
interface Written {
  id: string;
  kind: 'prefix' | 'prompt';
  /** prefix: per layer [1, kvHeads, P, D] keys and values; prompt: [P, hidden] embeddings. */
  cache?: KvCache;
  embeds?: Float32Array;
  tokens: number;
}

const promptLearning = (peftType: string, extra: Record<string, unknown>) => ({
  peft_type: peftType, task_type: 'CAUSAL_LM', inference_mode: true, base_model_name_or_path: 'demo', revision: null, ...extra,
});

/** PEFT's get_prompt for one batch row: view [P, L·2, heads, D], permute to per-layer [heads, P, D], key = 2l, value = 2l+1. */
function peftPast(t: Float32Array, P: number, L: number, KV: number, D: number): KvCache {
  const layers = Array.from({ length: L }, () => ({ key: new Float32Array(KV * P * D), value: new Float32Array(KV * P * D) }));
  for (let p = 0; p < P; p++) {
    for (let j = 0; j < 2 * L; j++) {
      for (let h = 0; h < KV; h++) {
        for (let d = 0; d < D; d++) {
          const v = t[((p * 2 * L + j) * KV + h) * D + d];
          const dst = j % 2 === 0 ? layers[j >> 1].key : layers[j >> 1].value;
          dst[(h * P + p) * D + d] = v;
        }
      }
    }
  }
  return { batch: 1, heads: KV, len: P, dim: D, layers };
}

/** OpenDelta's PrefixLayerGPT2: past_key [P, heads·D] → x.reshape(P, heads, -1).transpose(0, 1). */
function openDeltaPast(keys: Float32Array[], values: Float32Array[], P: number, KV: number, D: number): KvCache {
  const lay = (x: Float32Array) => {
    const out = new Float32Array(KV * P * D);
    for (let p = 0; p < P; p++) for (let h = 0; h < KV; h++) for (let d = 0; d < D; d++) out[(h * P + p) * D + d] = x[(p * KV + h) * D + d];
    return out;
  };
  return { batch: 1, heads: KV, len: P, dim: D, layers: keys.map((k, l) => ({ key: lay(k), value: lay(values[l]) })) };
}

/** The original graph with its token-embedding table extended by `embeds` rows (ids vocab.. read them). */
async function extendedTableSession(bb: Backbone, embeds: Float32Array): Promise<Session> {
  const model = decodeModel(encodeModel(bb.source.model));
  const g = model.graph!;
  const gather = g.node!.find((n) => n.opType === 'Gather' && n.input![1] === 'input_ids')!;
  const table = g.initializer!.find((t) => t.name === gather.input![0])!;
  const H = Number(table.dims![1]);
  const base = floatData(table);
  const ext = new Float32Array(base.length + embeds.length);
  ext.set(base);
  ext.set(embeds, base.length);
  const name = 'test::extended_wte';
  g.initializer!.push(floatTensor(name, ext, [ext.length / H, H]));
  gather.input![0] = name;
  return createSession(encodeModel(model));
}

for (const model of FAMILIES) {
  describe(`prompt learning served as KV prefixes on ${model}`, () => {
    let bb: Backbone;
    let session: Session;
    let sites: ReturnType<typeof defaultGraph>['sites'];
    let original: Session;
    const written: Written[] = [];
    const loaded = new Map<string, LoadedDelta>();
    const refSessions = new Map<string, Session>();
    const engine = (prefillChunkTokens = 512) => new Engine(session, bb.io, sites, { maxBatch: 32, prefillChunkTokens, eosTokenIds: [], maxPositions: bb.info.maxPositions });
    const promptOf = (i: number) => tokens(3 + ((i * 5) % 9), 500 + i, bb.io.vocabSize);

    before(async () => {
      ({ bb } = await demo(model));
      const g = defaultGraph(bb);
      assert.ok(g.promptEmbeds, 'the rewrite adds prompt_embeds');
      sites = g.sites;
      session = await createSession(g.bytes);
      original = await createSession(encodeModel(bb.source.model));
      const { numLayers: L, hiddenSize: H } = bb.info;
      const { kvHeads: KV, headDim: D } = bb.io;
      const dir = join(testCacheDir(), `prefix-${Math.random().toString(36).slice(2)}`);
      const registry = await Registry.open({ dir: join(dir, 'deltas'), backbone: bb.info, cacheBytes: 2 ** 30 });
      const put = async (w: Written, files: Record<string, unknown>) => {
        await registry.register(w.id, await writeDelta(join(dir, 'upload', w.id), files), { replace: false });
        loaded.set(w.id, await registry.load(w.id));
        written.push(w);
      };
      // PEFT PREFIX_TUNING: token_dim and num_attention_heads are the K/V width and heads (PEFT #1901).
      const P1 = 5;
      const prefixT = randomFloats(P1 * L * 2 * KV * D, 71, 1.5);
      await put({ id: 'peft-prefix', kind: 'prefix', tokens: P1, cache: peftPast(prefixT, P1, L, KV, D) }, {
        'adapter_config.json': promptLearning('PREFIX_TUNING', {
          num_virtual_tokens: P1, token_dim: KV * D, num_transformer_submodules: 1, num_attention_heads: KV, num_layers: L,
          encoder_hidden_size: H, prefix_projection: false,
        }),
        'adapter_model.safetensors': encodeSafetensors({ prompt_embeddings: { dtype: 'F32', shape: [P1, L * 2 * KV * D], data: prefixT } }),
      });
      // PEFT PROMPT_TUNING and P_TUNING: [P, token_dim] embeddings (P-tuning's already through its encoder).
      const scale = model === 'demo:gpt2' ? 0.3 : 1;
      for (const [id, type, P, seed] of [['peft-prompt', 'PROMPT_TUNING', 4, 72], ['peft-ptuning', 'P_TUNING', 7, 73]] as const) {
        const e = randomFloats(P * H, seed, scale);
        await put({ id, kind: 'prompt', tokens: P, embeds: e }, {
          'adapter_config.json': promptLearning(type, {
            num_virtual_tokens: P, token_dim: H, num_transformer_submodules: 1, num_attention_heads: bb.info.hiddenSize / D, num_layers: L,
            ...(type === 'P_TUNING' ? { encoder_reparameterization_type: 'MLP', encoder_hidden_size: H, encoder_num_layers: 2, encoder_dropout: 0 } : { prompt_tuning_init: 'RANDOM' }),
          }),
          'adapter_model.safetensors': encodeSafetensors({ prompt_embeddings: { dtype: 'F32', shape: [P, H], data: e } }),
        });
      }
      // OpenDelta soft_prompt: soft_prompt_layer.soft_embeds on the backbone's root.
      const Psoft = 3;
      const soft = randomFloats(Psoft * H, 74, scale);
      await put({ id: 'od-soft', kind: 'prompt', tokens: Psoft, embeds: soft }, {
        'config.json': { delta_type: 'soft_prompt', soft_token_num: Psoft, init_range: 0.5, token_init: false, modified_modules: ['root'] },
        'model.safetensors': encodeSafetensors({ 'soft_prompt_layer.soft_embeds': { dtype: 'F32', shape: [Psoft, H], data: soft } }),
      });
      // OpenDelta prefix (GPT-2's attn modules only, as OpenDelta implements it), reparameterize off.
      if (bb.info.family === 'gpt2') {
        const Pod = 4;
        const keys = Array.from({ length: L }, (_, l) => randomFloats(Pod * KV * D, 80 + l, 1.5));
        const values = Array.from({ length: L }, (_, l) => randomFloats(Pod * KV * D, 90 + l, 1.5));
        const tensors: Record<string, { dtype: 'F32'; shape: number[]; data: Float32Array }> = {};
        for (let l = 0; l < L; l++) {
          tensors[`transformer.h.${l}.attn.prefix.past_key`] = { dtype: 'F32', shape: [Pod, KV * D], data: keys[l] };
          tensors[`transformer.h.${l}.attn.prefix.past_value`] = { dtype: 'F32', shape: [Pod, KV * D], data: values[l] };
        }
        await put({ id: 'od-prefix', kind: 'prefix', tokens: Pod, cache: openDeltaPast(keys, values, Pod, KV, D) }, {
          'config.json': { delta_type: 'prefix', prefix_token_num: Pod, reparameterize: false, modified_modules: ['attn'] },
          'model.safetensors': encodeSafetensors(tensors),
        });
      }
      // A LoRA beside them, for the mixed batch.
      const target = bb.info.family === 'gpt2' ? 'c_attn' : 'q_proj';
      const mods = bb.info.modules.filter((m) => m.name.endsWith(target));
      const lora: Record<string, { dtype: 'F32'; shape: number[]; data: Float32Array }> = {};
      mods.forEach((m, k) => {
        lora[`base_model.model.${m.name}.lora_A.weight`] = { dtype: 'F32', shape: [4, m.inFeatures], data: randomFloats(4 * m.inFeatures, 100 + k, 0.3) };
        lora[`base_model.model.${m.name}.lora_B.weight`] = { dtype: 'F32', shape: [m.outFeatures, 4], data: randomFloats(4 * m.outFeatures, 200 + k, 0.3) };
      });
      await registry.register('lora', await writeDelta(join(dir, 'upload', 'lora'), {
        'adapter_config.json': { ...PEFT_BASE_CONFIG, target_modules: [target], fan_in_fan_out: bb.info.family === 'gpt2' },
        'adapter_model.safetensors': encodeSafetensors(lora),
      }), { replace: false });
      loaded.set('lora', await registry.load('lora'));
      // And a bottleneck adapter (OpenDelta format), as the kind tests write it.
      const [adapter] = await loadCases(bb, [{ id: 'adapter', kind: 'adapter', bottleneck: 8, activation: 'relu', targets: [bb.info.family === 'gpt2' ? 'mlp.c_proj' : 'mlp.down_proj'], seed: 31 }]);
      loaded.set('adapter', adapter.delta);
    });

    /** Greedy tokens of the reference for `w` after `prompt`, checked position by position against `got`. */
    async function reference(w: Written | null, prompt: number[], got: number[]): Promise<number[]> {
      const V = bb.io.vocabSize;
      const argmax = (l: Float32Array) => l.reduce((best, x, i) => (x > l[best] ? i : best), 0);
      const seq = [...prompt, ...got.slice(0, -1)];
      if (!w) {
        const { logits } = await runOriginal(original, bb.io, { ids: [seq], past: emptyCache(bb.io, 1) });
        return got.map((_, i) => argmax(at(logits, seq.length, V, 0, prompt.length - 1 + i)));
      }
      const P = w.tokens;
      if (w.kind === 'prefix') {
        const { logits } = await runOriginal(original, bb.io, {
          ids: [seq], past: w.cache!, mask: [new Array(P + seq.length).fill(1)], pos: [seq.map((_, i) => P + i)],
        });
        return got.map((_, i) => argmax(at(logits, seq.length, V, 0, prompt.length - 1 + i)));
      }
      if (!refSessions.has(w.id)) refSessions.set(w.id, await extendedTableSession(bb, w.embeds!));
      const ids = [...Array.from({ length: P }, (_, i) => V + i), ...seq];
      const { logits } = await runOriginal(refSessions.get(w.id)!, bb.io, { ids: [ids], past: emptyCache(bb.io, 1) });
      return got.map((_, i) => argmax(at(logits, ids.length, V, 0, P + prompt.length - 1 + i)));
    }

    /** Each row's tokens; `decodeRows` gets each step's count of rows decoded together. */
    async function serve(rows: { delta: LoadedDelta | null; promptIds: number[] }[], chunkTokens?: number, decodeRows: number[] = []): Promise<number[][]> {
      const e = engine(chunkTokens);
      const out = rows.map(() => [] as number[]);
      rows.forEach((r, rowId) => e.add({ rowId, promptIds: r.promptIds, sampling: GREEDY, maxNewTokens: NEW_TOKENS, delta: r.delta }));
      while (!e.idle) {
        const s = await e.step();
        decodeRows.push(s.stats.decodeRows);
        for (const t of s.tokens) out[t.rowId].push(t.token);
      }
      return out;
    }

    test('each format alone equals its reference from the original graph, and changes the output', async () => {
      for (const [i, w] of written.entries()) {
        const prompt = promptOf(i);
        const [got] = await serve([{ delta: loaded.get(w.id)!, promptIds: prompt }]);
        assert.equal(got.length, NEW_TOKENS);
        assert.deepEqual(got, await reference(w, prompt, got), `${w.id}: served tokens differ from the reference`);
        const [bare] = await serve([{ delta: null, promptIds: prompt }]);
        assert.notDeepEqual(got, bare, `${w.id}: the prefix changed nothing, so the test would not see it`);
      }
    });

    test('a batch mixing prefix-tuned, prompt-tuned, LoRA, adapter and bare rows gives each row what it gives alone', async () => {
      const deltas: (LoadedDelta | null)[] = [...written.map((w) => loaded.get(w.id)!), loaded.get('lora')!, loaded.get('adapter')!, null];
      // Twice over, with prompts of different lengths, so rows with and without prefixes share prefill groups and decode steps.
      const rows = [...deltas, ...deltas.slice().reverse()].map((delta, i) => ({ delta, promptIds: promptOf(i + 3) }));
      const decodeRows: number[] = [];
      const mixed = await serve(rows, undefined, decodeRows);
      assert.equal(Math.max(...decodeRows), rows.length, `every row decodes in one step at least once (steps: ${decodeRows})`);
      // Prefilled in chunks of a few tokens per row, the prefixes in place before the first: the same tokens.
      assert.deepEqual(await serve(rows, 2 * rows.length), mixed, 'a chunked prefill gives the same tokens');
      for (const [i, r] of rows.entries()) {
        const [alone] = await serve([r]);
        assert.deepEqual(mixed[i], alone, `row ${i} (${r.delta?.id ?? 'bare'}) differs from the same request alone`);
        const w = written.find((x) => x.id === r.delta?.id) ?? null;
        if (r.delta?.type !== 'lora' && r.delta?.type !== 'adapter') assert.deepEqual(mixed[i], await reference(w, r.promptIds, mixed[i]), `row ${i}: differs from the reference`);
      }
    });

    test("prompt tuning's prefix is computed once per loaded delta and then reused", async () => {
      const d = loaded.get('peft-prompt')!;
      assert.equal(Atomics.load(d.prefix!.ready, 0), 1, 'computed by the earlier tests');
      const before = d.prefix!.keys.slice();
      await serve([{ delta: d, promptIds: promptOf(1) }]);
      assert.deepEqual(d.prefix!.keys, before);
      assert.equal(d.bytes, d.prefix!.keys.byteLength * 2 + d.prefix!.embeds!.byteLength, 'the K/V are counted in the delta\'s bytes');
    });
  });
}

describe('through the served stack (worker thread, scheduler)', () => {
  test('prompt_tokens counts the real tokens, the virtual ones count in the context, and the worker computes the prompt prefix', async (t) => {
    const stack = await startStack('demo:gpt2');
    t.after(() => stack.close());
    const { backbone, registry, scheduler } = stack.services;
    const H = backbone.info.hiddenSize;
    const P = 6;
    const embeds = randomFloats(P * H, 77, 0.3);
    await registry.register('soft', await writeDelta(join(stack.scratch, 'soft'), {
      'adapter_config.json': promptLearning('PROMPT_TUNING', { num_virtual_tokens: P, token_dim: H, num_transformer_submodules: 1 }),
      'adapter_model.safetensors': encodeSafetensors({ prompt_embeddings: { dtype: 'F32', shape: [P, H], data: embeds } }),
    }), { replace: false });
    const text = 'The prefix comes first';
    const ids = backbone.tokenizer.encode(text, { addSpecialTokens: true });
    const run = await generate(stack.services, 'soft', text, params({ maxNewTokens: NEW_TOKENS }));
    assert.equal(run.result.promptTokens, ids.length, 'prompt_tokens are the real tokens only');
    const ref = await extendedTableSession(backbone, embeds);
    const V = backbone.io.vocabSize;
    const seq = [...Array.from({ length: P }, (_, i) => V + i), ...ids, ...run.tokens.slice(0, -1)];
    const { logits } = await runOriginal(ref, backbone.io, { ids: [seq], past: emptyCache(backbone.io, 1) });
    const argmax = (l: Float32Array) => l.reduce((best, x, i) => (x > l[best] ? i : best), 0);
    assert.deepEqual(run.tokens, run.tokens.map((_, i) => argmax(at(logits, seq.length, V, 0, P + ids.length - 1 + i))));

    // The context holds virtual + real + generated tokens: a prompt that fits alone but not with the prefix is refused,
    // and one that leaves room for 2 more tokens gets 2.
    const max = backbone.info.maxPositions;
    const long = (n: number) => 'x'.repeat(n - (ids.length - text.length));
    assert.equal(scheduler.countTokens(long(max - P)), max - P);
    await assert.rejects(generate(stack.services, 'soft', long(max - P), params()), (e: unknown) => e instanceof ServeError && e.status === 422 && /virtual tokens/.test(e.message));
    const tight = await generate(stack.services, 'soft', long(max - P - 2), params({ maxNewTokens: 50 }));
    assert.equal(tight.result.generatedTokens, 2);
    assert.equal(tight.result.finishReason, 'length');
  });
});
