/**
 * The backbone loader: the module tree as PEFT names it, specific errors for
 * a graph that is not a KV-cache decoder and for a model dir missing a file,
 * and the `export` path (writeDemoDir → loadBackbone) giving the demo's logits.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { loadBackbone } from '../src/backbone/backbone.js';
import { ModelFormatError } from '../src/backbone/decoder-io.js';
import { writeDemoDir } from '../src/backbone/demo/materialize.js';
import { DEMO_SPECS } from '../src/backbone/demo/spec.js';
import { DataType, GraphBuilder } from '../src/backbone/onnx/graph-builder.js';
import { encodeModel } from '../src/backbone/onnx/proto.js';
import { findLinearModules } from '../src/backbone/modules.js';
import { demo, emptyCache, maxAbsDiff, originalSession, runOriginal, tokens } from './helpers/engine-graph.js';

const work = mkdtempSync(join(tmpdir(), 'deltaserve-loader-'));
after(() => rmSync(work, { recursive: true, force: true }));

describe('module tree', () => {
  test('demo:llama: q/k/v/o and MLP projections of every layer, PEFT names, in/out features, no bias', async () => {
    const { bb } = await demo('demo:llama');
    const mods = new Map(bb.info.modules.map((m) => [m.name, m]));
    const q = mods.get('model.layers.0.self_attn.q_proj');
    assert.deepEqual(q && [q.inFeatures, q.outFeatures, q.layer, q.biasInitializer], [128, 128, 0, null]);
    const k = mods.get('model.layers.3.self_attn.k_proj'); // GQA: 2 KV heads × 32
    assert.deepEqual(k && [k.inFeatures, k.outFeatures, k.layer], [128, 64, 3]);
    const down = mods.get('model.layers.2.mlp.down_proj');
    assert.deepEqual(down && [down.inFeatures, down.outFeatures], [352, 128]);
    assert.equal(bb.info.modules.filter((m) => m.layer !== null).length, 4 * 7);
    assert.equal(bb.info.family, 'llama');
    assert.deepEqual(bb.info.defaultTargets.lora, ['q_proj', 'v_proj']);
  });

  test('demo:gpt2: Conv1D Gemm scopes give transformer.h.N.attn.c_attn 128→384 with its bias', async () => {
    const { bb } = await demo('demo:gpt2');
    const mods = new Map(bb.info.modules.map((m) => [m.name, m]));
    const c = mods.get('transformer.h.0.attn.c_attn');
    assert.deepEqual(c && [c.inFeatures, c.outFeatures, c.layer, c.biasInitializer], [128, 384, 0, 'transformer.h.0.attn.c_attn.bias']);
    for (const [name, i, o] of [['transformer.h.3.attn.c_proj', 128, 128], ['transformer.h.1.mlp.c_fc', 128, 512], ['transformer.h.1.mlp.c_proj', 512, 128]] as const) {
      const m = mods.get(name);
      assert.deepEqual(m && [m.inFeatures, m.outFeatures], [i, o], name);
    }
    assert.equal(bb.info.modules.filter((m) => m.layer !== null).length, 4 * 4);
    assert.equal(bb.linear.find((m) => m.name === 'transformer.h.0.attn.c_attn')!.twoD, true);
    const bias = bb.info.biasOf('transformer.h.0.attn.c_attn');
    assert.equal(bias?.length, 384);
    assert.deepEqual(bb.info.defaultTargets.lora, ['c_attn']);
  });

  test('a prefixed scope and a MatMul + Add fold are still found by name, with the Add as output', () => {
    const g = new GraphBuilder();
    const x = g.input('x', DataType.FLOAT, [1, 1, 8]);
    const w = g.weight('w', new Float32Array(8 * 16), [8, 16]);
    const b = g.weight('b', new Float32Array(16), [16]);
    const y = g.scope('/model/transformer/h.0/attn/c_attn', () => g.op('MatMul', [x, w]));
    const z = g.scope('/model/transformer/h.0/attn/c_attn', () => g.op('Add', [y, b]));
    g.output(z, DataType.FLOAT, [1, 1, 16]);
    const [m] = findLinearModules(g.graph('t'));
    assert.deepEqual([m.name, m.inFeatures, m.outFeatures, m.biasInitializer, m.output], ['model.transformer.h.0.attn.c_attn', 8, 16, 'b', z]);
  });
});

describe('loader errors', () => {
  /** A model dir with a demo's config and tokenizer files but `model.onnx` replaced. */
  async function dirWith(name: string, bytes: Uint8Array): Promise<string> {
    const dir = join(work, name);
    rmSync(dir, { recursive: true, force: true });
    await writeDemoDir(DEMO_SPECS['demo:gpt2'], dir);
    writeFileSync(join(dir, 'model.onnx'), bytes);
    return dir;
  }

  test('a graph without past_key_values is refused, naming the missing KV-cache inputs and how to export', async () => {
    const g = new GraphBuilder();
    const ids = g.input('input_ids', DataType.INT64, ['batch_size', 'sequence_length']);
    g.input('attention_mask', DataType.INT64, ['batch_size', 'sequence_length']);
    const emb = g.weight('wte', new Float32Array(16 * 4), [16, 4]);
    g.opNamed('Gather', [emb, ids], 'logits');
    g.output('logits', DataType.FLOAT, ['batch_size', 'sequence_length', 4]);
    const dir = await dirWith('no-past', g.encode('encoder-ish'));
    await assert.rejects(loadBackbone({ model: dir }), (e: Error) => {
      assert.ok(e instanceof ModelFormatError, e.name);
      assert.match(e.message, /not a decoder with KV-cache I\/O/);
      assert.match(e.message, /past_key_values\.N\.key\/value/);
      assert.match(e.message, /text-generation-with-past/);
      assert.doesNotMatch(e.message, /input_ids|attention_mask|output logits/, 'only what is missing is named');
      return true;
    });
  });

  test('a decoder whose present outputs are missing names each missing output', async () => {
    const { bb } = await demo('demo:gpt2');
    const model = { ...bb.source.model, graph: { ...bb.source.model.graph!, output: bb.source.model.graph!.output!.filter((o) => o.name !== 'present.2.value') } };
    const dir = await dirWith('no-present', encodeModel(model));
    await assert.rejects(loadBackbone({ model: dir }), /incomplete KV cache: missing output present\.2\.value;/);
  });

  test('a model dir missing a file names the file', async () => {
    const dir = join(work, 'missing-tok');
    await writeDemoDir(DEMO_SPECS['demo:llama'], dir);
    unlinkSync(join(dir, 'tokenizer.json'));
    await assert.rejects(loadBackbone({ model: dir }), (e: Error) => {
      assert.ok(e instanceof ModelFormatError);
      assert.match(e.message, /lacks tokenizer\.json \(/);
      assert.doesNotMatch(e.message, /model\.onnx,|config\.json,/);
      return true;
    });
    unlinkSync(join(dir, 'model.onnx'));
    await assert.rejects(loadBackbone({ model: dir }), /lacks a model file \(model\.onnx, onnx\/model\.onnx, .*onnx\/model_fp16\.onnx.*\), tokenizer\.json/);
    await assert.rejects(loadBackbone({ model: join(work, 'nowhere') }), /model directory .*nowhere does not exist/);
  });

  test('an unknown embedded backbone lists the valid names', async () => {
    await assert.rejects(loadBackbone({ model: 'demo:bert', cacheDir: work }), /unknown embedded backbone demo:bert: use demo, demo:llama/);
  });
});

describe('export', () => {
  for (const model of ['demo:llama', 'demo:gpt2'] as const) {
    test(`${model}: writeDemoDir → loadBackbone on the directory gives the demo's module tree and logits`, async () => {
      const dir = join(work, `export-${model.replace(':', '-')}`);
      await writeDemoDir(DEMO_SPECS[model], dir);
      const loaded = await loadBackbone({ model: dir });
      const { bb } = await demo(model);
      assert.equal(loaded.info.fingerprint, bb.info.fingerprint);
      assert.equal(loaded.info.family, bb.info.family);
      assert.deepEqual(loaded.io, bb.io);
      const ids = [tokens(7, 5, bb.io.vocabSize)];
      const a = await runOriginal(await originalSession(loaded), loaded.io, { ids, past: emptyCache(loaded.io, 1) });
      const b = await runOriginal(await originalSession(bb), bb.io, { ids, past: emptyCache(bb.io, 1) });
      assert.equal(maxAbsDiff(a.logits, b.logits), 0);
      // The exported tokenizer round-trips through the same loader.
      assert.equal(loaded.tokenizer.decode(loaded.tokenizer.encode('hello deltas')), 'hello deltas');
    });
  }
});
