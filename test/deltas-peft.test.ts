import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { ServeError } from '../src/errors.js';
import { Registry } from '../src/deltas/registry.js';
import type { Dtype } from '../src/deltas/safetensors.js';
import type { DeltaFile } from '../src/deltas/types.js';
import { gpt2Like, gpt2Small } from './helpers/backbone-info.js';
import {
  expectedBank,
  maxAbsDiff,
  peftFactors,
  rawF32,
  randomFloats,
  tempDir,
  tensor,
  treeHash,
  writeDelta,
  writePeft,
} from './helpers/deltas.js';

const FIXTURE = fileURLToPath(new URL('../../shared/fixtures/peft-gpt2-lora-causal/', import.meta.url));
const small = gpt2Like(2, 16);

async function openRegistry(t: TestContext, backbone = small) {
  const dir = await tempDir(t, 'store');
  return { dir, registry: await Registry.open({ dir, backbone, cacheBytes: 1 << 30 }) };
}

test('the real GPT-2 PEFT adapter registers on GPT-2 small with exactly its 36 modules', async (t) => {
  if (!existsSync(join(FIXTURE, 'adapter_model.safetensors'))) {
    t.skip(`fixture ${FIXTURE} is absent (a fresh clone has no ../shared), so the real-adapter test is skipped`);
    return;
  }
  const { registry } = await openRegistry(t, gpt2Small());
  const files: DeltaFile[] = (await readdir(FIXTURE)).map((name) => ({ name, path: join(FIXTURE, name) }));
  const record = await registry.register('tigrinya', files, { replace: false });
  assert.equal(record.type, 'lora');
  assert.equal(record.format, 'peft');
  assert.equal(record.rank, 8);

  const expectedModules: string[] = [];
  for (let l = 0; l < 12; l++) {
    expectedModules.push(`transformer.h.${l}.attn.c_attn`, `transformer.h.${l}.attn.c_proj`, `transformer.h.${l}.mlp.c_proj`);
  }
  assert.deepEqual(record.sites.map((s) => s.module).sort(), expectedModules.sort());
  assert.equal(record.sites.length, 36);

  // Bank values straight from the file's bytes: a = Aᵀ, b = (32 / 8)·Bᵀ.
  const raw = await rawF32(join(FIXTURE, 'adapter_model.safetensors'));
  const delta = await registry.load('tigrinya');
  assert.equal(delta.sites.length, 36);
  for (const site of delta.sites) {
    const A = raw.get(`base_model.model.${site.module}.lora_A.weight`)!;
    const B = raw.get(`base_model.model.${site.module}.lora_B.weight`)!;
    const [r, inF] = A.shape;
    const outF = B.shape[0];
    const want = expectedBank(A.data, B.data, r, inF, outF, 32 / 8);
    assert.equal(maxAbsDiff(site.data.lora_a, want.a), 0, `${site.module} a`);
    assert.equal(maxAbsDiff(site.data.lora_b, want.b), 0, `${site.module} b`);
  }
  assert.equal(delta.bytes, delta.sites.reduce((n, s) => n + s.data.lora_a.byteLength + s.data.lora_b.byteLength, 0));
});

test('the same LoRA in F32, F16 and BF16 gives the same bank values within each format\'s rounding', async (t) => {
  const { registry } = await openRegistry(t);
  const r = 4;
  const A = randomFloats(r * 16, 7, 0.5);
  const B = randomFloats(48 * r, 8, 0.5);
  const scale = 8 / r;
  const want = expectedBank(A, B, r, 16, 48, scale);
  for (const [dtype, rel] of [['F32', 2 ** -24], ['F16', 2 ** -11], ['BF16', 2 ** -8]] as [Dtype, number][]) {
    const dir = await tempDir(t, dtype);
    const files = await writePeft(dir, { target_modules: ['c_attn'], layers_to_transform: [0] }, {
      'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight': { dtype, shape: [r, 16], data: A },
      'base_model.model.transformer.h.0.attn.c_attn.lora_B.weight': { dtype, shape: [48, r], data: B },
    });
    await registry.register(`lora-${dtype}`, files, { replace: false });
    const { data } = (await registry.load(`lora-${dtype}`)).sites[0];
    // Each element is one rounded value times an exact power-of-two scale.
    for (const [got, exp] of [[data.lora_a, want.a], [data.lora_b, want.b]] as const) {
      for (let i = 0; i < exp.length; i++) {
        assert.ok(Math.abs(got[i] - exp[i]) <= Math.abs(exp[i]) * rel + 1e-12, `${dtype}[${i}] ${got[i]} vs ${exp[i]}`);
      }
    }
  }
});

test('rsLoRA, rank_pattern, alpha_pattern, a regex target and layers_to_transform', async (t) => {
  const { registry } = await openRegistry(t);
  const dir = await tempDir(t, 'patterns');
  const tensors = {
    ...peftFactors([['transformer.h.1.attn.c_attn', 16, 48]], 2, 11),
    ...peftFactors([['transformer.h.1.mlp.c_fc', 16, 64]], 4, 21),
  };
  const files = await writePeft(
    dir,
    {
      r: 4,
      lora_alpha: 8,
      use_rslora: true,
      target_modules: '.*\\.(c_attn|c_fc)',
      layers_to_transform: 1,
      layers_pattern: 'h',
      rank_pattern: { c_attn: 2 },
      alpha_pattern: { 'mlp\\.c_fc': 3 },
    },
    tensors,
  );
  await registry.register('patterns', files, { replace: false });
  const delta = await registry.load('patterns');
  assert.equal(delta.rank, 4);
  const [attn, fc] = delta.sites;
  assert.equal(attn.module, 'transformer.h.1.attn.c_attn');
  assert.equal(attn.axes.rank, 2);
  const get = (k: string) => tensors[`base_model.model.transformer.h.1.${k}`].data;
  const wantAttn = expectedBank(get('attn.c_attn.lora_A.weight'), get('attn.c_attn.lora_B.weight'), 2, 16, 48, 8 / Math.sqrt(2));
  assert.ok(maxAbsDiff(attn.data.lora_b, wantAttn.b) < 1e-7);
  const wantFc = expectedBank(get('mlp.c_fc.lora_A.weight'), get('mlp.c_fc.lora_B.weight'), 4, 16, 64, 3 / Math.sqrt(4));
  assert.equal(fc.module, 'transformer.h.1.mlp.c_fc');
  assert.ok(maxAbsDiff(fc.data.lora_b, wantFc.b) < 1e-7);
});

interface Refusal {
  name: string;
  config?: Record<string, unknown>;
  extra?: Record<string, ReturnType<typeof tensor>>;
  /** Replace the weights with these files. */
  files?: Record<string, unknown>;
  code: 'unsupported_delta' | 'invalid_delta';
  reason: RegExp;
}

const refusals: Refusal[] = [
  { name: 'DoRA', config: { use_dora: true }, code: 'unsupported_delta', reason: /use_dora is true: DoRA rescales/ },
  {
    name: 'modules_to_save',
    config: { modules_to_save: ['score'] },
    code: 'unsupported_delta',
    reason: /modules_to_save is \["score"\].*retrain without modules_to_save/,
  },
  {
    name: 'a classifier head tensor',
    extra: { 'base_model.model.score.weight': tensor([2, 16], 5) },
    code: 'unsupported_delta',
    reason: /tensor 'base_model\.model\.score\.weight' is not a parameter of a PEFT LORA adapter/,
  },
  {
    name: 'task_type SEQ_CLS',
    config: { task_type: 'SEQ_CLS' },
    code: 'unsupported_delta',
    reason: /task_type is SEQ_CLS; .*task_type CAUSAL_LM/,
  },
  { name: 'bias all', config: { bias: 'all' }, code: 'unsupported_delta', reason: /bias is "all"/ },
  { name: 'bias lora_only', config: { bias: 'lora_only' }, code: 'unsupported_delta', reason: /bias is "lora_only"/ },
  {
    name: 'pickle weights',
    files: { 'adapter_model.bin': new Uint8Array([0x80, 0x02]) },
    code: 'unsupported_delta',
    reason: /adapter_model\.bin is a pickle.*save_file.*adapter_model\.safetensors/,
  },
  { name: 'peft_type LOHA', config: { peft_type: 'LOHA' }, code: 'unsupported_delta', reason: /peft_type is LOHA; deltaserve serves PEFT adapters of peft_type LORA, IA3, PREFIX_TUNING, PROMPT_TUNING, P_TUNING/ },
];

for (const c of refusals) {
  test(`PEFT refusal: ${c.name} → 422 with the reason, store unchanged`, async (t) => {
    const { dir: storeDir, registry } = await openRegistry(t);
    const good = await writePeft(await tempDir(t, 'good'), { layers_to_transform: [0] }, peftFactors([['transformer.h.0.attn.c_attn', 16, 48]], 4, 1));
    await registry.register('existing', good, { replace: false });
    const before = await treeHash(storeDir);

    const dir = await tempDir(t, 'bad');
    let files: DeltaFile[];
    if (c.files) {
      files = await writeDelta(dir, { 'adapter_config.json': { peft_type: 'LORA', task_type: 'CAUSAL_LM', r: 4, target_modules: ['c_attn'] }, ...c.files });
    } else {
      files = await writePeft(dir, c.config ?? {}, { ...peftFactors([['transformer.h.0.attn.c_attn', 16, 48], ['transformer.h.1.attn.c_attn', 16, 48]], 4, 1), ...c.extra });
    }
    for (const replace of [false, true]) {
      const id = replace ? 'existing' : 'newcomer';
      await assert.rejects(registry.register(id, files, { replace }), (err: unknown) => {
        assert.ok(err instanceof ServeError);
        assert.equal(err.status, 422);
        assert.equal(err.code, c.code);
        assert.match(err.message, c.reason);
        assert.ok(err.details!.some((d) => c.reason.test(d)));
        return true;
      });
    }
    assert.equal(await treeHash(storeDir), before);
    assert.deepEqual((await registry.list()).map((d) => d.id), ['existing']);
  });
}

test('several PEFT problems are reported together', async (t) => {
  const { registry } = await openRegistry(t);
  const files = await writePeft(await tempDir(t, 'multi'), { use_dora: true, bias: 'all', task_type: 'TOKEN_CLS' }, {
    ...peftFactors([['transformer.h.0.attn.c_attn', 16, 48], ['transformer.h.1.attn.c_attn', 16, 48]], 4, 1),
    'base_model.model.classifier.weight': tensor([2, 16], 3),
  });
  await assert.rejects(registry.register('multi', files, { replace: false }), (err: ServeError) => {
    assert.equal(err.details!.length, 4);
    assert.match(err.message, /and 3 more problems; see details/);
    return true;
  });
});
