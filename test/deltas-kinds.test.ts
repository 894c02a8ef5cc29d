/**
 * The kinds added to LoRA, adapters and BitFit, at registration: what each
 * lays out in its site's banks (the low-rank adapter's factors on its own site), checked against PyTorch's own outputs for
 * OpenDelta's compacter, low-rank adapter and parallel adapter
 * (scripts/record-opendelta-kinds.py), against the file's own values for
 * PEFT's IA³, and every refusal with its reason.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Registry } from '../src/deltas/registry.js';
import { encodeSafetensors } from '../src/deltas/safetensors.js';
import type { ServeError } from '../src/errors.js';
import { gpt2Like, llamaLike } from './helpers/backbone-info.js';
import { rawF32, tempDir, tensor, writeDelta, writeOpenDelta, writePeft } from './helpers/deltas.js';

const FIXTURES = fileURLToPath(new URL('./fixtures/opendelta-kinds/', import.meta.url));
const small = gpt2Like(1, 16);

async function openRegistry(t: TestContext, backbone = small) {
  return Registry.open({ dir: await tempDir(t, 'store'), backbone, cacheBytes: 1 << 30 });
}

/** erf to ~1e-7 (Abramowitz & Stegun 7.1.26), for exact gelu. */
function erf(x: number): number {
  const s = Math.sign(x);
  const a = Math.abs(x);
  const t = 1 / (1 + 0.3275911 * a);
  const y = 1 - ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * Math.exp(-a * a);
  return s * y;
}
const ACT: Record<string, (z: number) => number> = {
  relu: (z) => Math.max(0, z),
  gelu: (z) => 0.5 * z * (1 + erf(z / Math.SQRT2)),
  gelu_new: (z) => 0.5 * z * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (z + 0.044715 * z ** 3))),
  silu: (z) => z / (1 + Math.exp(-z)),
};
const SELECTOR = ['relu', 'gelu', 'gelu_new', 'silu'];

/** What the adapter site adds for one row, from its bank slices, in double precision: act(y·D + x·P + d)·U + u. */
function adapterSite(data: Record<string, Float32Array>, rank: number, x: number[], y: number[]): number[] {
  const act = ACT[SELECTOR[data.adapter_act.indexOf(1)]];
  const z = Array.from({ length: rank }, (_, k) => {
    let acc = data.adapter_down_bias?.[k] ?? 0;
    if (data.adapter_down) for (let i = 0; i < y.length; i++) acc += y[i] * data.adapter_down[i * rank + k];
    if (data.adapter_in) for (let i = 0; i < x.length; i++) acc += x[i] * data.adapter_in[i * rank + k];
    return act(acc);
  });
  return y.map((yo, o) => {
    let acc = yo + (data.adapter_up_bias?.[o] ?? 0);
    for (let k = 0; k < rank; k++) acc += z[k] * data.adapter_up[k * y.length + o];
    return acc;
  });
}

/** What the low-rank adapter site adds for one row, from its bank slices, in double precision: (act((y·l_d)·r_d + b_d)·l_u)·r_u + b_u. */
function lowRankSite(data: Record<string, Float32Array>, bottleneck: number, _x: number[], y: number[]): number[] {
  const act = ACT[SELECTOR[data.lowrank_act.indexOf(1)]];
  const s = y.reduce((acc, v, i) => acc + v * data.lowrank_down_l[i], 0);
  const z = Array.from({ length: bottleneck }, (_, k) => act(s * data.lowrank_down_r[k] + data.lowrank_down_bias[k]));
  const t = z.reduce((acc, v, k) => acc + v * data.lowrank_up_l[k], 0);
  return y.map((yo, o) => yo + t * data.lowrank_up_r[o] + data.lowrank_up_bias[o]);
}

const SITE_ROWS = {
  adapter: (data: Record<string, Float32Array>, axes: Record<string, number>, x: number[], y: number[]) => adapterSite(data, axes.rank, x, y),
  low_rank_adapter: (data: Record<string, Float32Array>, axes: Record<string, number>, x: number[], y: number[]) => lowRankSite(data, axes.bottleneck, x, y),
};

for (const [folder, kind, site] of [
  ['compacter', 'compacter', 'adapter'],
  ['compacter-full-weight', 'compacter', 'adapter'],
  ['low_rank_adapter', 'low_rank_adapter', 'low_rank_adapter'],
  ['parallel_adapter', 'parallel_adapter', 'adapter'],
] as const) {
  test(`OpenDelta ${folder}: the ${site}-site rows equal PyTorch's outputs for OpenDelta's layer (≤ 1e-5)`, async (t) => {
    const registry = await openRegistry(t);
    const dir = join(FIXTURES, folder);
    const files = [{ name: 'config.json', path: join(dir, 'config.json') }, { name: 'model.safetensors', path: join(dir, 'model.safetensors') }];
    const record = await registry.register(folder, files, { replace: false });
    assert.equal(record.type, kind);
    assert.deepEqual(record.sites.map((s) => [s.module, s.kind, s.site]), [
      ['transformer.h.0.attn.c_proj', kind, site],
      ['transformer.h.0.mlp.c_proj', kind, site],
    ]);
    const io = await rawF32(join(dir, 'io.safetensors'));
    let worst = 0;
    for (const s of (await registry.load(folder)).sites) {
      const [x, y, out] = ['x', 'y', 'out'].map((k) => io.get(`${s.module}.${k}`)!);
      const rows = y.shape[0];
      for (let r = 0; r < rows; r++) {
        const row = (m: { shape: number[]; data: number[] }) => m.data.slice(r * m.shape[1], (r + 1) * m.shape[1]);
        const got = SITE_ROWS[site](s.data, s.axes, row(x), row(y));
        const want = row(out);
        for (let o = 0; o < got.length; o++) worst = Math.max(worst, Math.abs(got[o] - want[o]));
      }
    }
    t.diagnostic(`${folder}: max abs diff vs PyTorch ${worst.toExponential(2)}`);
    assert.ok(worst <= 1e-5, `max abs diff ${worst}`);
  });
}

test('compacter: the bottleneck is the module\'s features / reduction_factor, and GET shows the adapter it computes', async (t) => {
  const registry = await openRegistry(t);
  const dir = join(FIXTURES, 'compacter');
  const record = await registry.register('c', [
    { name: 'config.json', path: join(dir, 'config.json') }, { name: 'model.safetensors', path: join(dir, 'model.safetensors') },
  ], { replace: false });
  assert.equal(record.rank, 4);
  assert.deepEqual(record.sites[0].shapes, [[16, 4], [4], [4, 16], [16]]);
});

/** The compacter fixture's files, its config changed by `change` and its tensors by `edit`. */
async function alteredCompacter(t: TestContext, change: Record<string, unknown>, edit: (ts: Record<string, ReturnType<typeof tensor>>) => void) {
  const dir = join(FIXTURES, 'compacter');
  const config = { ...JSON.parse(await readFile(join(dir, 'config.json'), 'utf8')), ...change };
  const raw = await rawF32(join(dir, 'model.safetensors'));
  const tensors = Object.fromEntries([...raw].map(([k, v]) => [k, { dtype: 'F32' as const, shape: v.shape, data: Float32Array.from(v.data) }]));
  edit(tensors);
  return writeOpenDelta(await tempDir(t, 'alt'), config, tensors);
}

test('compacter refusals list every problem: a missing factor, a stray tensor, a division that does not divide', async (t) => {
  const registry = await openRegistry(t);
  const files = await alteredCompacter(t, {}, (ts) => {
    delete ts['transformer.h.0.attn.c_proj.compactor.up_sampler.W_right'];
    ts['transformer.h.0.mlp.c_proj.compactor.down_sampler.W'] = tensor([4, 4, 1], 3);
  });
  await assert.rejects(registry.register('bad', files, { replace: false }), (err: ServeError) => {
    assert.equal(err.status, 422);
    const details = err.details!.join('\n');
    assert.match(details, /module 'transformer\.h\.0\.attn\.c_proj' has no up_sampler\.W_right tensor/);
    assert.match(details, /tensor 'transformer\.h\.0\.mlp\.c_proj\.compactor\.down_sampler\.W' does not belong to a compacter with factorized_phm=true/);
    return true;
  });
  const odd = await alteredCompacter(t, { hypercomplex_division: 3 }, () => {});
  await assert.rejects(registry.register('odd', odd, { replace: false }), /hypercomplex_division 3 does not divide/);
});

test('parallel adapter in OpenDelta\'s paired form (one module\'s input to another\'s output) is refused by shape', async (t) => {
  const registry = await openRegistry(t);
  // Paired on mlp.c_fc → mlp.c_proj, OpenDelta saves the same adapter under both: its down_proj reads c_fc's 16 inputs.
  const p = (m: string) => `transformer.h.0.mlp.${m}.parallel_adapter.modulelist`;
  const tensors = Object.fromEntries(['c_fc', 'c_proj'].flatMap((m) => [
    [`${p(m)}.down_proj.weight`, tensor([4, 16], 1)], [`${p(m)}.down_proj.bias`, tensor([4], 2)],
    [`${p(m)}.up_proj.weight`, tensor([16, 4], 3)], [`${p(m)}.up_proj.bias`, tensor([16], 4)],
  ]));
  const files = await writeOpenDelta(await tempDir(t, 'pa'), { delta_type: 'parallel_adapter', modified_modules: ['c_fc', 'c_proj'], bottleneck_dim: 4 }, tensors);
  await assert.rejects(registry.register('pa', files, { replace: false }), (err: ServeError) => {
    const details = err.details!.join('\n');
    assert.match(details, /module 'transformer\.h\.0\.mlp\.c_fc' \(in 16, out 64\): up_proj\.weight .* is \[16, 4\], expected \[64, 4\]/);
    assert.match(details, /module 'transformer\.h\.0\.mlp\.c_proj' \(in 64, out 16\): down_proj\.weight .* is \[4, 16\], expected \[4, 64\]/);
    return true;
  });
});

// ---------------------------------------------------------------- IA³

const IA3 = { peft_type: 'IA3', task_type: 'CAUSAL_LM', fan_in_fan_out: true, init_ia3_weights: true };

test('PEFT IA³: a feed-forward module\'s [1, in] vector scales its input, the others\' [out, 1] their output', async (t) => {
  const registry = await openRegistry(t);
  const l = (shape: number[], seed: number) => tensor(shape, seed, 'F32', 0.5);
  const tensors = {
    'base_model.model.transformer.h.0.attn.c_attn.ia3_l': l([48, 1], 1),
    'base_model.model.transformer.h.0.mlp.c_proj.ia3_l': l([1, 64], 2),
  };
  const files = await writePeft(await tempDir(t, 'ia3'), { ...IA3, target_modules: ['c_attn', 'mlp.c_proj'], feedforward_modules: ['mlp.c_proj'] }, tensors);
  const record = await registry.register('ia3', files, { replace: false });
  assert.equal(record.type, 'ia3');
  assert.equal(record.rank, 0);
  assert.deepEqual(record.sites.map((s) => [s.module, s.kind, s.site, s.shapes]), [
    ['transformer.h.0.attn.c_attn', 'ia3', 'ia3', [[48]]],
    ['transformer.h.0.mlp.c_proj', 'ia3', 'ia3', [[64]]],
  ]);
  const [attn, proj] = (await registry.load('ia3')).sites;
  assert.deepEqual(Object.keys(attn.data), ['ia3_out']);
  assert.deepEqual([...attn.data.ia3_out], [...tensors['base_model.model.transformer.h.0.attn.c_attn.ia3_l'].data]);
  assert.deepEqual(Object.keys(proj.data), ['ia3_in']);
  assert.deepEqual([...proj.data.ia3_in], [...tensors['base_model.model.transformer.h.0.mlp.c_proj.ia3_l'].data]);
});

test('PEFT IA³: feedforward_modules as a regex, as PEFT matches it (the whole path)', async (t) => {
  const registry = await openRegistry(t, llamaLike(1, 8, 12));
  const files = await writePeft(await tempDir(t, 'ia3r'), { ...IA3, target_modules: ['k_proj', 'down_proj'], feedforward_modules: '.*mlp\\.down_proj' }, {
    'base_model.model.model.layers.0.self_attn.k_proj.ia3_l': tensor([8, 1], 1),
    'base_model.model.model.layers.0.mlp.down_proj.ia3_l': tensor([1, 12], 2),
  });
  const delta = await (await registry.register('r', files, { replace: false }), registry.load('r'));
  assert.deepEqual(delta.sites.map((s) => Object.keys(s.data)[0]), ['ia3_out', 'ia3_in']);
});

test('PEFT IA³ refusals: a vector whose shape disagrees with feedforward_modules, one that fits neither way, a bad regex', async (t) => {
  const registry = await openRegistry(t);
  const files = await writePeft(await tempDir(t, 'bad'), { ...IA3, target_modules: ['c_attn', 'c_fc'], feedforward_modules: ['c_attn'] }, {
    'base_model.model.transformer.h.0.attn.c_attn.ia3_l': tensor([48, 1], 1),
    'base_model.model.transformer.h.0.mlp.c_fc.ia3_l': tensor([1, 64], 2),
  });
  await assert.rejects(registry.register('bad', files, { replace: false }), (err: ServeError) => {
    assert.equal(err.status, 422);
    const details = err.details!.join('\n');
    assert.match(details, /module 'transformer\.h\.0\.attn\.c_attn': ia3_l is \[48, 1\], which scales its output, but feedforward_modules names it/);
    assert.match(details, /module 'transformer\.h\.0\.mlp\.c_fc' \(in 16, out 64\): ia3_l .* is \[1, 64\], expected \[1, 16\] \(a feed-forward module: scales its input\) or \[64, 1\]/);
    return true;
  });
  const regex = await writePeft(await tempDir(t, 'rx'), { ...IA3, target_modules: ['c_attn'], feedforward_modules: '(' }, {
    'base_model.model.transformer.h.0.attn.c_attn.ia3_l': tensor([48, 1], 1),
  });
  await assert.rejects(registry.register('rx', regex, { replace: false }), /feedforward_modules: '\(' is not a valid regular expression/);
});

test('peft_type decides the kind: an IA³ vector under a LoRA config is refused as not a LoRA parameter', async (t) => {
  const registry = await openRegistry(t);
  const files = await writeDelta(await tempDir(t, 'mix'), {
    'adapter_config.json': { peft_type: 'LORA', task_type: 'CAUSAL_LM', r: 4, target_modules: ['c_attn'] },
    'adapter_model.safetensors': encodeSafetensors({ 'base_model.model.transformer.h.0.attn.c_attn.ia3_l': tensor([48, 1], 1) }),
  });
  await assert.rejects(registry.register('mix', files, { replace: false }),
    /tensor 'base_model\.model\.transformer\.h\.0\.attn\.c_attn\.ia3_l' is not a parameter of a PEFT LORA adapter \(expected <module>\.lora_A\.weight and <module>\.lora_B\.weight\)/);
});
