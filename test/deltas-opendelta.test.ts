import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { ServeError } from '../src/errors.js';
import { Registry } from '../src/deltas/registry.js';
import { backboneBias, gpt2Like, llamaLike } from './helpers/backbone-info.js';
import { expectedBank, maxAbsDiff, tempDir, tensor, treeHash, writeDelta, writeOpenDelta, writePeft, peftFactors } from './helpers/deltas.js';

const small = gpt2Like(2, 16);

async function openRegistry(t: TestContext, backbone = small) {
  const dir = await tempDir(t, 'store');
  return { dir, registry: await Registry.open({ dir, backbone, cacheBytes: 1 << 30 }) };
}

test('OpenDelta LoRA: lora.lora_A/lora_B with scale lora_alpha / lora_r', async (t) => {
  const { registry } = await openRegistry(t);
  const tensors = {
    'transformer.h.0.mlp.c_fc.lora.lora_A': tensor([2, 16], 1),
    'transformer.h.0.mlp.c_fc.lora.lora_B': tensor([64, 2], 2),
  };
  const files = await writeOpenDelta(await tempDir(t, 'od'), { delta_type: 'lora', modified_modules: ['h.0.mlp.c_fc'], lora_r: 2, lora_alpha: 6 }, tensors);
  const rec = await registry.register('od-lora', files, { replace: false });
  assert.equal(rec.format, 'opendelta');
  assert.deepEqual(rec.sites, [{ module: 'transformer.h.0.mlp.c_fc', kind: 'lora', site: 'lora', shapes: [[16, 2], [2, 64]] }]);
  const site = (await registry.load('od-lora')).sites[0];
  const want = expectedBank(tensors['transformer.h.0.mlp.c_fc.lora.lora_A'].data, tensors['transformer.h.0.mlp.c_fc.lora.lora_B'].data, 2, 16, 64, 3);
  assert.ok(maxAbsDiff(site.data.lora_a, want.a) === 0);
  assert.ok(maxAbsDiff(site.data.lora_b, want.b) < 1e-7);
});

test('OpenDelta adapter on a module output, [r] regex addressing, default gelu_new', async (t) => {
  const { registry } = await openRegistry(t);
  const p = (l: number) => `transformer.h.${l}.attn.c_proj.adapter.modulelist`;
  const tensors = Object.fromEntries(
    [0, 1].flatMap((l) => [
      [`${p(l)}.down_proj.weight`, tensor([3, 16], 10 + l)],
      [`${p(l)}.down_proj.bias`, tensor([3], 20 + l)],
      [`${p(l)}.up_proj.weight`, tensor([16, 3], 30 + l)],
      [`${p(l)}.up_proj.bias`, tensor([16], 40 + l)],
    ]),
  );
  const files = await writeOpenDelta(await tempDir(t, 'ad'), { delta_type: 'adapter', modified_modules: ['[r]h\\.\\d+\\.attn\\.c_proj'], bottleneck_dim: 3 }, tensors);
  const rec = await registry.register('od-adapter', files, { replace: false });
  assert.equal(rec.rank, 3);
  assert.deepEqual(rec.sites[1], { module: 'transformer.h.1.attn.c_proj', kind: 'adapter', site: 'adapter', shapes: [[16, 3], [3], [3, 16], [16]] });
  const delta = await registry.load('od-adapter');
  const sites = delta.sites;
  assert.deepEqual(sites.map((s) => s.module), ['transformer.h.0.attn.c_proj', 'transformer.h.1.attn.c_proj']);
  const s = sites[1].data;
  // The activation selector: relu, gelu, gelu_new, silu.
  assert.deepEqual([...s.adapter_act], [0, 0, 1, 0]);
  const dw = tensors[`${p(1)}.down_proj.weight`].data;
  const uw = tensors[`${p(1)}.up_proj.weight`].data;
  // down: [out, bottleneck] = down_proj.weightᵀ; up: [bottleneck, out] = up_proj.weightᵀ.
  for (let o = 0; o < 16; o++) {
    for (let k = 0; k < 3; k++) {
      assert.equal(s.adapter_down[o * 3 + k], dw[k * 16 + o]);
      assert.equal(s.adapter_up[k * 16 + o], uw[o * 3 + k]);
    }
  }
  assert.deepEqual([...s.adapter_down_bias], [...tensors[`${p(1)}.down_proj.bias`].data]);
  assert.deepEqual([...s.adapter_up_bias], [...tensors[`${p(1)}.up_proj.bias`].data]);
});

test('OpenDelta BitFit: the delta is the tuned bias minus the backbone bias (zeros when it has none)', async (t) => {
  const { registry } = await openRegistry(t);
  const tuned = tensor([48], 5);
  const files = await writeOpenDelta(await tempDir(t, 'bf'), { delta_type: 'bitfit', modified_modules: ['h.1.attn.c_attn'] }, { 'transformer.h.1.attn.c_attn.bias': tuned });
  await registry.register('od-bitfit', files, { replace: false });
  const bias = (await registry.load('od-bitfit')).sites[0].data.bias;
  const own = backboneBias('transformer.h.1.attn.c_attn', 48);
  for (let i = 0; i < 48; i++) assert.ok(Math.abs(bias[i] - (tuned.data[i] - own[i])) < 1e-6);

  // Llama has no biases: the tuned bias is the delta itself. A block name broadcasts to the linears inside it.
  const llama = llamaLike(1, 8, 12);
  const { registry: lr } = await openRegistry(t, llama);
  const names = ['q_proj', 'k_proj', 'v_proj', 'o_proj'].map((n) => `model.layers.0.self_attn.${n}.bias`);
  const biases = Object.fromEntries(names.map((n, i) => [n, tensor([8], 50 + i)]));
  const lfiles = await writeOpenDelta(await tempDir(t, 'bfl'), { delta_type: 'bitfit', modified_modules: ['self_attn'] }, biases);
  await lr.register('bitfit', lfiles, { replace: false });
  const sites = (await lr.load('bitfit')).sites;
  assert.equal(sites.length, 4);
  for (const s of sites) assert.deepEqual([...s.data.bias], [...biases[`${s.module}.bias`].data]);
});

const refusals: { name: string; files: Record<string, unknown>; code: string; reason: RegExp }[] = [
  {
    name: 'pytorch_model.bin',
    files: { 'config.json': { delta_type: 'lora', modified_modules: ['c_attn'] }, 'pytorch_model.bin': new Uint8Array([0x80]) },
    code: 'unsupported_delta',
    reason: /pytorch_model\.bin is a pickle.*torch\.load\('pytorch_model\.bin'.*save_file\(.*'model\.safetensors'\)/,
  },
  {
    name: 'delta_type split',
    files: { 'config.json': { delta_type: 'split', modified_modules: ['attn'] }, 'model.safetensors': new Uint8Array(0) },
    code: 'unsupported_delta',
    reason: /OpenDelta delta_type 'split' is not supported; deltaserve serves lora, adapter, bitfit, compacter, low_rank_adapter, parallel_adapter, prefix, soft_prompt/,
  },
  {
    name: 'low_rank_adapter with low_rank_rank 2',
    files: { 'config.json': { delta_type: 'low_rank_adapter', modified_modules: ['attn'], low_rank_rank: 2 }, 'model.safetensors': new Uint8Array(0) },
    code: 'unsupported_delta',
    reason: /low_rank_rank is 2: OpenDelta's LowRankLinear multiplies W_left and W_right elementwise/,
  },
  {
    name: 'compacter with shared_phm_rule',
    files: { 'config.json': { delta_type: 'compacter', modified_modules: ['attn'], shared_phm_rule: true }, 'model.safetensors': new Uint8Array(0) },
    code: 'unsupported_delta',
    reason: /shared_phm_rule is true, which OpenDelta's own CompacterModel refuses/,
  },
  {
    name: 'non_linearity tanh',
    files: { 'config.json': { delta_type: 'adapter', modified_modules: ['c_proj'], non_linearity: 'tanh' }, 'model.safetensors': new Uint8Array(0) },
    code: 'unsupported_delta',
    reason: /non_linearity 'tanh' is not supported/,
  },
];

for (const c of refusals) {
  test(`OpenDelta refusal: ${c.name} → 422 with the reason, store unchanged`, async (t) => {
    const { dir: storeDir, registry } = await openRegistry(t);
    await registry.register('keep', await writePeft(await tempDir(t, 'g'), { layers_to_transform: [0] }, peftFactors([['transformer.h.0.attn.c_attn', 16, 48]], 4, 1)), { replace: false });
    const before = await treeHash(storeDir);
    const files = await writeDelta(await tempDir(t, 'bad'), c.files);
    await assert.rejects(registry.register('bad', files, { replace: false }), (err: ServeError) => {
      assert.equal(err.status, 422);
      assert.equal(err.code, c.code);
      assert.match(err.message, c.reason);
      return true;
    });
    assert.equal(await treeHash(storeDir), before);
  });
}

test('OpenDelta: a tensor that is not a delta parameter is refused', async (t) => {
  const { registry } = await openRegistry(t);
  const files = await writeOpenDelta(await tempDir(t, 'x'), { delta_type: 'lora', modified_modules: ['h.0.attn.c_attn'], lora_r: 2 }, {
    'transformer.h.0.attn.c_attn.lora.lora_A': tensor([2, 16], 1),
    'transformer.h.0.attn.c_attn.lora.lora_B': tensor([48, 2], 2),
    'transformer.ln_f.weight': tensor([16], 3),
  });
  await assert.rejects(registry.register('x', files, { replace: false }), /tensor 'transformer\.ln_f\.weight' is not a parameter of an OpenDelta lora delta/);
});
