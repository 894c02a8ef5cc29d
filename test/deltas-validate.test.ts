import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { ServeError } from '../src/errors.js';
import { Registry } from '../src/deltas/registry.js';
import { gpt2Like, llamaLike } from './helpers/backbone-info.js';
import { peftFactors, tempDir, tensor, treeHash, writePeft } from './helpers/deltas.js';

async function openRegistry(t: TestContext, backbone = gpt2Like(2, 16), maxRank?: number) {
  const dir = await tempDir(t, 'store');
  return { dir, registry: await Registry.open({ dir, backbone, cacheBytes: 1 << 30, maxRank }) };
}

async function refusal(p: Promise<unknown>): Promise<ServeError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof ServeError);
    assert.equal(err.status, 422);
    return err;
  }
  assert.fail('expected a 422');
}

test('every problem is listed: unknown module, shape, non-finite values, rank over the maximum, unmatched target', async (t) => {
  const { dir: storeDir, registry } = await openRegistry(t, gpt2Like(2, 16), 4);
  const before = await treeHash(storeDir);
  const tensors = {
    ...peftFactors([['transformer.h.0.attn.c_attn', 16, 48]], 8, 1),
    ...peftFactors([['transformer.h.1.attn.c_attn', 20, 48]], 8, 3), // wrong in_features
    ...peftFactors([['transformer.h.7.attn.c_attn', 16, 48]], 8, 5), // no layer 7
  };
  tensors['base_model.model.transformer.h.0.attn.c_attn.lora_B.weight'].data[5] = NaN;
  tensors['base_model.model.transformer.h.0.attn.c_attn.lora_B.weight'].data[9] = Infinity;
  const files = await writePeft(await tempDir(t, 'bad'), { r: 8, target_modules: ['c_attn', 'q_proj'] }, tensors);
  const err = await refusal(registry.register('bad', files, { replace: false }));
  assert.equal(err.code, 'invalid_delta');
  const want = [
    "target_modules entry 'q_proj' matches no linear module of the backbone 'gpt2-test'",
    "module 'transformer.h.7.attn.c_attn' has weights but matches no module of the backbone 'gpt2-test'",
    "module 'transformer.h.1.attn.c_attn' (in 16, out 48): lora_A 'base_model.model.transformer.h.1.attn.c_attn.lora_A.weight' is [8, 20], expected [8, 16]",
    "tensor 'base_model.model.transformer.h.0.attn.c_attn.lora_B.weight' has 2 non-finite values (NaN or Inf), the first at index 5",
    "rank 8 (module 'transformer.h.0.attn.c_attn') exceeds this server's maximum rank 4",
  ];
  assert.deepEqual([...err.details!].sort(), [...want].sort());
  assert.match(err.message, /^delta 'bad' refused: .* \(and 4 more problems; see details\)$/);
  assert.equal(await treeHash(storeDir), before);
});

test('a GPT-2 adapter on a Llama backbone is refused with a message that says so', async (t) => {
  const { registry } = await openRegistry(t, llamaLike(2, 16, 32, 'demo-llama'));
  const files = await writePeft(await tempDir(t, 'gpt2'), { target_modules: ['c_attn', 'c_proj'] }, peftFactors([
    ['transformer.h.0.attn.c_attn', 16, 48],
    ['transformer.h.0.attn.c_proj', 16, 16],
  ], 4, 1));
  const err = await refusal(registry.register('wrong-family', files, { replace: false }));
  assert.match(
    err.message,
    /refused: this delta was made for a gpt2 model \(its modules are named c_attn, c_proj\), but the backbone 'demo-llama' is a llama model .*register it on a gpt2 backbone/,
  );
  assert.ok(err.details!.includes("module 'transformer.h.0.attn.c_attn' has weights but matches no module of the backbone 'demo-llama'"));
});

test('module names match on whole segments from the end, whatever the wrapper prefix', async (t) => {
  const { registry } = await openRegistry(t);
  // Saved from GPT2Model (no `transformer.` prefix) instead of GPT2LMHeadModel.
  const files = await writePeft(await tempDir(t, 'bare'), { r: 2, target_modules: ['attn.c_proj'] }, {
    'base_model.model.h.0.attn.c_proj.lora_A.weight': tensor([2, 16], 1),
    'base_model.model.h.0.attn.c_proj.lora_B.weight': tensor([16, 2], 2),
    'base_model.model.h.1.attn.c_proj.lora_A.weight': tensor([2, 16], 3),
    'base_model.model.h.1.attn.c_proj.lora_B.weight': tensor([16, 2], 4),
  });
  const rec = await registry.register('bare', files, { replace: false });
  assert.deepEqual(rec.sites.map((s) => s.module), ['transformer.h.0.attn.c_proj', 'transformer.h.1.attn.c_proj']);
  // `proj` is not a whole segment of `c_proj`.
  const partial = await writePeft(await tempDir(t, 'partial'), { r: 2, target_modules: ['proj'] }, peftFactors([['transformer.h.0.attn.c_proj', 16, 16]], 2, 1));
  const err = await refusal(registry.register('partial', partial, { replace: false }));
  assert.ok(err.details!.includes("target_modules entry 'proj' matches no linear module of the backbone 'gpt2-test'"));
});

test('a module the config targets but the weights leave out is a problem', async (t) => {
  const { registry } = await openRegistry(t);
  const files = await writePeft(await tempDir(t, 'missing'), { target_modules: ['c_attn'] }, peftFactors([['transformer.h.0.attn.c_attn', 16, 48]], 4, 1));
  const err = await refusal(registry.register('missing', files, { replace: false }));
  assert.deepEqual(err.details, ["module 'transformer.h.1.attn.c_attn' is selected by target_modules but the weights have nothing for it"]);
});

test('a rank within the maximum registers and reports its rank', async (t) => {
  const { registry } = await openRegistry(t, gpt2Like(1, 16), 4);
  const files = await writePeft(await tempDir(t, 'ok'), { r: 4 }, peftFactors([['transformer.h.0.attn.c_attn', 16, 48]], 4, 1));
  const rec = await registry.register('ok', files, { replace: false });
  assert.equal(rec.rank, 4);
  assert.equal((await registry.load('ok')).sites[0].data.lora_a.length, 16 * 4);
});
