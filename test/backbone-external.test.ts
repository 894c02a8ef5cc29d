/**
 * Models over protobuf's 2 GB keep their weights in external data files. The
 * loader must read them in place, the engine must run them without inlining
 * (the rewritten graph would not fit in one protobuf), and a crafted model
 * must not reach files outside its folder.
 */
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { before, test } from 'node:test';
import { loadBackbone, type Backbone } from '../src/backbone/backbone.js';
import { writeDemoDir } from '../src/backbone/demo/materialize.js';
import { DEMO_SPECS } from '../src/backbone/demo/spec.js';
import { engineModelSource } from '../src/backbone/engine-model.js';
import { decodeModel, encodeModel, onnx } from '../src/backbone/onnx/proto.js';
import { buildEngineGraph } from '../src/backbone/rewrite/index.js';
import { planSites } from '../src/deltas/kinds/index.js';
import { createSession } from '../src/backbone/session.js';
import { Engine } from '../src/engine/engine.js';

const SIDE_FILES = ['config.json', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json'];

/** Moves every initializer over 1 KiB into `model.onnx_data`, as torch.onnx does for big models. */
function externalize(from: string, to: string, location = 'model.onnx_data'): void {
  const model = decodeModel(readFileSync(join(from, 'model.onnx')));
  const chunks: Uint8Array[] = [];
  let offset = 0;
  for (const t of model.graph!.initializer!) {
    const raw = t.rawData;
    if (!raw || raw.length < 1024) continue;
    chunks.push(Uint8Array.prototype.slice.call(raw));
    t.externalData = [
      { key: 'location', value: location },
      { key: 'offset', value: String(offset) },
      { key: 'length', value: String(raw.length) },
    ];
    t.dataLocation = onnx.TensorProto.DataLocation.EXTERNAL;
    t.rawData = new Uint8Array(0);
    offset += raw.length;
  }
  writeFileSync(join(to, 'model.onnx'), encodeModel(model));
  writeFileSync(join(to, 'model.onnx_data'), Buffer.concat(chunks));
  for (const f of SIDE_FILES) copyFileSync(join(from, f), join(to, f));
}

async function greedy(bb: Backbone, model: Uint8Array | string): Promise<number[]> {
  const graph = buildEngineGraph(bb, planSites(bb));
  const engine = new Engine(await createSession(model), bb.io, graph.sites, {
    maxBatch: 2, prefillChunkTokens: 512, eosTokenIds: [], maxPositions: bb.info.maxPositions,
  });
  engine.add({
    rowId: 1, promptIds: bb.tokenizer.encode('external data'), maxNewTokens: 8, delta: null,
    sampling: { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: 0 },
  });
  const out: number[] = [];
  while (!engine.idle) out.push(...(await engine.step()).tokens.map((t) => t.token));
  return out;
}

let inline: Backbone;
let external: Backbone;
let root: string;

before(async () => {
  root = mkdtempSync(join(tmpdir(), 'deltaserve-external-'));
  const a = join(root, 'inline');
  const b = join(root, 'external');
  await writeDemoDir(DEMO_SPECS['demo:gpt2'], a);
  mkdirSync(b);
  externalize(a, b);
  inline = await loadBackbone({ model: a });
  external = await loadBackbone({ model: b });
});

test('a model with external data loads with its weights left in place', () => {
  assert.deepEqual(external.source.externalFiles, ['model.onnx_data']);
  const inModel = external.source.model.graph!.initializer!.filter((t) => (t.rawData?.length ?? 0) > 1024);
  assert.equal(inModel.length, 0, 'no big tensor was inlined into the model proto');
  assert.equal(external.info.fingerprint, inline.info.fingerprint);
  for (const m of inline.info.modules.filter((x) => x.biasInitializer)) {
    assert.deepEqual(Array.from(external.info.biasOf(m.name)!), Array.from(inline.info.biasOf(m.name)!), m.name);
  }
});

test('the engine runs it from a folder of links, and generates what the inline model generates', async () => {
  const graph = buildEngineGraph(external, planSites(external));
  const source = await engineModelSource(external, graph.bytes, join(root, 'cache'));
  assert.equal(typeof source, 'string', 'an external-data model is loaded from a path');
  const weights = new Set(external.source.model.graph!.initializer!.filter((t) => t.externalData?.length).map((t) => t.name));
  const inlined = decodeModel(graph.bytes).graph!.initializer!.filter((t) => weights.has(t.name) && (t.rawData?.length ?? 0) > 0).map((t) => t.name);
  assert.ok(weights.size > 0);
  assert.deepEqual(inlined, [], 'the rewritten graph points at the external weights and inlines none of them');
  const expected = await greedy(inline, buildEngineGraph(inline, planSites(inline)).bytes);
  assert.equal(expected.length, 8);
  assert.deepEqual(await greedy(external, source), expected);
});

test('external data that points outside the model folder is refused', async () => {
  const evil = join(root, 'evil');
  mkdirSync(evil);
  externalize(join(root, 'inline'), evil, '../inline/model.onnx');
  await assert.rejects(loadBackbone({ model: evil }), /outside the model folder/);
});

test('with the cache on another filesystem, the graph is written beside the model instead', { skip: !existsSync('/dev/shm') && 'no /dev/shm here' }, async (t) => {
  const graph = buildEngineGraph(external, planSites(external));
  const otherFs = mkdtempSync('/dev/shm/deltaserve-cache-');
  try {
    const source = await engineModelSource(external, graph.bytes, otherFs);
    // Hard links cannot cross filesystems: this only tests the fallback where /dev/shm is another one.
    if (typeof source === 'string' && source.startsWith(otherFs)) {
      t.skip('/dev/shm shares the model folder\'s filesystem here');
      return;
    }
    assert.equal(typeof source, 'string');
    assert.equal(dirname(source as string), external.source.dir);
    assert.deepEqual(await greedy(external, source), await greedy(inline, buildEngineGraph(inline, planSites(inline)).bytes));
  } finally {
    rmSync(otherFs, { recursive: true, force: true });
  }
});
