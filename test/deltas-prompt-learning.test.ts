/**
 * Prompt-learning deltas at registration: what PEFT's PREFIX_TUNING,
 * PROMPT_TUNING and P_TUNING and OpenDelta's prefix and soft_prompt become
 * (a KV prefix, counted in the delta's bytes, shown as one kv_prefix site),
 * and every refusal, each problem listed in one 422. The served outputs are
 * checked in engine-prefix.test.ts.
 */
import assert from 'node:assert/strict';
import { before, test, type TestContext } from 'node:test';
import type { BackboneInfo } from '../src/backbone/types.js';
import { Registry } from '../src/deltas/registry.js';
import { encodeSafetensors } from '../src/deltas/safetensors.js';
import { ServeError } from '../src/errors.js';
import { randomFloats, tempDir, treeHash, writeDelta } from './helpers/deltas.js';
import { demo } from './helpers/engine-graph.js';

let llama: BackboneInfo;
let gpt2: BackboneInfo;
before(async () => {
  llama = (await demo('demo:llama')).bb.info;
  gpt2 = (await demo('demo:gpt2')).bb.info;
});

const f32 = (shape: number[], seed = 1, scale = 0.5) => ({ dtype: 'F32' as const, shape, data: randomFloats(shape.reduce((a, b) => a * b, 1), seed, scale) });

function peft(type: string, cfg: Record<string, unknown>, shape: number[], data?: Float32Array) {
  return {
    'adapter_config.json': { peft_type: type, task_type: 'CAUSAL_LM', inference_mode: true, num_transformer_submodules: 1, ...cfg },
    'adapter_model.safetensors': encodeSafetensors({ prompt_embeddings: data ? { dtype: 'F32', shape, data } : f32(shape) }),
  };
}

/** PEFT's saved prefix config for a backbone: token_dim and heads are the K/V's (PEFT #1901). */
const prefixConfig = (b: BackboneInfo, P: number) => ({
  num_virtual_tokens: P, token_dim: b.kvHeads! * b.headDim!, num_attention_heads: b.kvHeads, num_layers: b.numLayers, prefix_projection: false,
});

async function register(t: TestContext, backbone: BackboneInfo, files: Record<string, unknown>) {
  const dir = await tempDir(t, 'store');
  const registry = await Registry.open({ dir, backbone, cacheBytes: 1 << 30 });
  return { dir, registry, record: () => registry.register('task', files as never, { replace: false }) };
}

async function refused(t: TestContext, backbone: BackboneInfo, files: Record<string, unknown>, code: string, reasons: RegExp[]) {
  const dir = await tempDir(t, 'store');
  const registry = await Registry.open({ dir, backbone, cacheBytes: 1 << 30 });
  const before = await treeHash(dir);
  await assert.rejects(registry.register('task', await writeDelta(await tempDir(t, 'up'), files), { replace: false }), (err: unknown) => {
    assert.ok(err instanceof ServeError);
    assert.equal(err.status, 422);
    assert.equal(err.code, code);
    for (const r of reasons) assert.ok(err.details!.some((d) => r.test(d)), `no problem matches ${r}: ${JSON.stringify(err.details)}`);
    return true;
  });
  assert.equal(await treeHash(dir), before, 'a refused delta leaves nothing behind');
}

test('PEFT PREFIX_TUNING on a grouped-query backbone: K/V width, laid out per layer as PEFT get_prompt does', async (t) => {
  const P = 3;
  const { numLayers: L } = llama;
  const KV = llama.kvHeads!;
  const D = llama.headDim!;
  const data = randomFloats(P * L * 2 * KV * D, 5, 1);
  const dir = await tempDir(t, 'store');
  const registry = await Registry.open({ dir, backbone: llama, cacheBytes: 1 << 30 });
  const rec = await registry.register('task', await writeDelta(await tempDir(t, 'up'), peft('PREFIX_TUNING', prefixConfig(llama, P), [P, L * 2 * KV * D], data)), { replace: false });
  assert.equal(rec.type, 'prefix');
  assert.equal(rec.format, 'peft');
  assert.deepEqual(rec.sites, [{ module: 'past_key_values', kind: 'prefix', site: 'kv_prefix', shapes: [[2 * L, P, KV * D]] }]);
  const d = await registry.load('task');
  assert.equal(d.prefix!.tokens, P);
  assert.equal(Atomics.load(d.prefix!.ready, 0), 1);
  assert.equal(d.bytes, 2 * L * KV * P * D * 4);
  // Layer 2's value (entry 2·2+1 of a row), head 1, virtual token 2, dim 7.
  const [l, h, p, dd] = [2, 1, 2, 7];
  assert.equal(d.prefix!.values[((l * KV + h) * P + p) * D + dd], data[p * L * 2 * KV * D + ((2 * l + 1) * KV + h) * D + dd]);
  assert.equal(d.prefix!.keys[((l * KV + h) * P + p) * D + dd], data[p * L * 2 * KV * D + ((2 * l) * KV + h) * D + dd]);
});

test('PROMPT_TUNING, P_TUNING and OpenDelta soft_prompt keep their embeddings and room for the K/V, all counted', async (t) => {
  const H = gpt2.hiddenSize;
  for (const [files, type, format] of [
    [peft('PROMPT_TUNING', { num_virtual_tokens: 4, token_dim: H }, [4, H]), 'prompt', 'peft'],
    [peft('P_TUNING', { num_virtual_tokens: 4, token_dim: H, encoder_reparameterization_type: 'MLP' }, [4, H]), 'prompt', 'peft'],
    [{ 'config.json': { delta_type: 'soft_prompt', soft_token_num: 4 }, 'model.safetensors': encodeSafetensors({ 'soft_prompt_layer.soft_embeds': f32([4, H]) }) }, 'prompt', 'opendelta'],
  ] as const) {
    const { registry } = await register(t, gpt2, {});
    const rec = await registry.register('task', await writeDelta(await tempDir(t, 'up'), files), { replace: false });
    assert.equal(rec.type, type);
    assert.equal(rec.format, format);
    const d = await registry.load('task');
    const kv = 2 * gpt2.numLayers * gpt2.kvHeads! * 4 * gpt2.headDim! * 4;
    assert.equal(d.bytes, kv + 4 * H * 4);
    assert.equal(Atomics.load(d.prefix!.ready, 0), 0, 'its K/V are computed by the engine, once');
  }
});

test('PEFT prompt learning: every problem listed in one 422', async (t) => {
  const { numLayers: L } = llama;
  const KV = llama.kvHeads!;
  const D = llama.headDim!;
  // A prefix saved by a PEFT before #1901 for a grouped-query model has the hidden width, and here a wrong layer count too.
  await refused(t, llama, peft('PREFIX_TUNING', { num_virtual_tokens: 3, token_dim: llama.hiddenSize, num_attention_heads: 4, num_layers: 6 }, [3, 6 * 2 * llama.hiddenSize]),
    'invalid_delta', [/num_layers is 6 but the backbone .* has 4 layers/, /grouped-query attention/, /expected \[3, 512\]/]);
  await refused(t, llama, peft('PREFIX_TUNING', { ...prefixConfig(llama, 3), num_transformer_submodules: 2 }, [3, L * 2 * KV * D]),
    'unsupported_delta', [/encoder-decoder/]);
  await refused(t, gpt2, peft('PROMPT_TUNING', { num_virtual_tokens: 4, token_dim: 64 }, [4, 64]),
    'invalid_delta', [/token_dim is 64 but the backbone .* embeds tokens in 128 dimensions/, /expected \[4, 128\]/]);
  const nan = randomFloats(4 * 128, 3);
  nan[5] = Number.NaN;
  await refused(t, gpt2, peft('P_TUNING', { num_virtual_tokens: 4, token_dim: 128 }, [4, 128], nan), 'invalid_delta', [/non-finite/]);
  await refused(t, gpt2, peft('PROMPT_TUNING', { num_virtual_tokens: 2000, token_dim: 128 }, [2000, 128]), 'invalid_delta', [/no room in the backbone's context of 1024/]);
  await refused(t, gpt2, {
    'adapter_config.json': { peft_type: 'PROMPT_TUNING', task_type: 'CAUSAL_LM', num_virtual_tokens: 2 },
    'adapter_model.safetensors': encodeSafetensors({ prompt_embeddings: f32([2, 128]), 'base_model.model.lm_head.weight': f32([2, 2]) }),
  }, 'unsupported_delta', [/tensor 'base_model.model.lm_head.weight' is not a parameter/]);
});

test('OpenDelta prefix: served without reparameterization on every layer, refused otherwise with the reason', async (t) => {
  const W = gpt2.kvHeads! * gpt2.headDim!;
  const layers = (n: number, P = 2) => Object.fromEntries(Array.from({ length: n }, (_, l) => [
    [`transformer.h.${l}.attn.prefix.past_key`, f32([P, W], l)], [`transformer.h.${l}.attn.prefix.past_value`, f32([P, W], 10 + l)],
  ]).flat());
  const ok = await register(t, gpt2, {});
  const rec = await ok.registry.register('task', await writeDelta(await tempDir(t, 'up'), {
    'config.json': { delta_type: 'prefix', prefix_token_num: 2, reparameterize: false, modified_modules: ['attn'] },
    'model.safetensors': encodeSafetensors(layers(gpt2.numLayers)),
  }), { replace: false });
  assert.equal(rec.type, 'prefix');
  await refused(t, gpt2, { 'config.json': { delta_type: 'prefix', prefix_token_num: 2, modified_modules: ['attn'] }, 'model.safetensors': encodeSafetensors(layers(4)) },
    'unsupported_delta', [/reparameterize is true/]);
  await refused(t, gpt2, { 'config.json': { delta_type: 'prefix', prefix_token_num: 2, reparameterize: false }, 'model.safetensors': encodeSafetensors(layers(2)) },
    'unsupported_delta', [/layers 2, 3 have no prefix/]);
  await refused(t, gpt2, { 'config.json': { delta_type: 'prefix', prefix_token_num: 3, reparameterize: false }, 'model.safetensors': encodeSafetensors(layers(4)) },
    'invalid_delta', [/expected \[3, 128\]/]);
});
