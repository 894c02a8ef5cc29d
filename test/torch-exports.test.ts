/**
 * Real torch exports (test/fixtures/torch, made by scripts/export-fixtures.py)
 * served through HTTP: the greedy ids equal PyTorch's recorded ids, bare and
 * with the fixture's PEFT LoRA, one request at a time and all in one mixed
 * batch; the split attention applies on every layer (from the rewrite's own
 * report); a request may use the whole context.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import request from 'supertest';
import type { Express } from 'express';
import { loadBackbone } from '../src/backbone/backbone.js';
import { decodeModel } from '../src/backbone/onnx/proto.js';
import { buildEngineGraph } from '../src/backbone/rewrite/index.js';
import { planSites } from '../src/deltas/kinds/index.js';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { REPO, startStack, streamedIds, uploadFolder, type Stack } from './helpers/e2e-stack.js';
import { torchFixture, torchFixtures, untilEos } from './helpers/fixtures.js';

/** Engine steps so far, and those that ran a single row (deltaserve_batch_size). */
async function batchSizes(app: Express): Promise<{ steps: number; single: number }> {
  const text = (await request(app).get('/metrics').expect(200)).text;
  const value = (re: RegExp) => Number(text.match(re)?.[1] ?? NaN);
  return { steps: value(/^deltaserve_batch_size_count (\S+)$/m), single: value(/^deltaserve_batch_size_bucket\{le="1"\} (\S+)$/m) };
}

test('inspect runs the serving rewrite and prints each layer\'s KV path', async () => {
  const { stdout } = await promisify(execFile)(process.execPath, ['--import', 'tsx', 'src/cli.ts', 'inspect', '--model', torchFixture('llama').dir], { cwd: REPO });
  assert.match(stdout, /KV cache: attention on 2 of 2 layers reads past and new without a Concat/);
  assert.match(stdout, /layer 0: split — .*repeat_kv applied to past and new separately/);
  assert.match(stdout, /layer 1: split — /);
});

test('a graph that cannot be served is refused naming the node and what was expected', async () => {
  const bb = await loadBackbone({ model: torchFixture('llama').dir });
  const graph = bb.source.model.graph!;
  // A non-linear op between lm_head's Cast and logits: not value-preserving, so not lm_head's output.
  const cast = graph.node!.find((n) => n.output!.includes('logits'))!;
  cast.output = ['logits/before-relu'];
  graph.node!.push({ name: '/test/Relu', opType: 'Relu', input: ['logits/before-relu'], output: ['logits'] });
  assert.throws(() => buildEngineGraph(bb, planSites(bb)),
    /walking back from logits reached Relu node \/test\/Relu; expected a MatMul, Gemm, MatMulNBits with a weight initializer \(or a MatMulInteger behind DynamicQuantizeLinear\), reached only through .*Cast/);
  // present.0.key made by something other than Concat(past, new).
  const bb2 = await loadBackbone({ model: torchFixture('gpt2').dir });
  const concat = bb2.source.model.graph!.node!.find((n) => n.output!.includes('present.0.key'))!;
  concat.attribute = concat.attribute!.map((a) => (a.name === 'axis' ? { ...a, i: 1 } : a));
  assert.throws(() => buildEngineGraph(bb2, planSites(bb2)), /present\.0\.key is produced by Concat node \/transformer\/h\.0\/attn\/Concat\S* on axis 1; expected Concat\(past, new\) on the sequence axis/);
});

for (const f of torchFixtures()) {
  describe(`torch export: ${f.name}`, { timeout: 120_000 }, () => {
    let stack: Stack;
    let eos: number;
    test('the rewrite reports the split attention on every layer, and no Concat reads the past', async () => {
      const bb = await loadBackbone({ model: f.dir });
      const graph = buildEngineGraph(bb, planSites(bb));
      assert.equal(graph.kvPaths.length, bb.io.layers);
      for (const l of graph.kvPaths) assert.equal(l.path, 'split', `layer ${l.layer}: ${l.reason}`);
      assert.equal(graph.splitLayers, bb.io.layers);
      const layout: Record<string, string> = { 'qwen2-onnx-community': 'onnx/decoder_model_merged.onnx', 'gpt2-fp16': 'onnx/model_fp16.onnx' };
      assert.equal(bb.source.modelFile, layout[f.name] ?? 'model.onnx');
      assert.equal(bb.io.float16, f.name.endsWith('fp16'));
      if (!f.name.startsWith('gpt2')) assert.match(graph.kvPaths[0].reason, /repeat_kv/, 'GQA: repeat_kv applied to past and new');
      assert.match(graph.kvPaths[0].reason, /Shape readers/);
      const nodes = decodeModel(graph.bytes).graph!.node!;
      const pastConcats = nodes.filter((n) => n.opType === 'Concat' && n.input!.some((i) => i.startsWith('past_key_values.')));
      assert.deepEqual(pastConcats.map((n) => n.name), [], 'no Concat(past, new) left in the served graph');
    });

    test('loads and takes its LoRA through HTTP', async () => {
      // Small prefill chunks: prompts run in several chunks, and near the context the past is packed.
      stack = await startStack({ env: { DELTASERVE_MODEL: f.dir, DELTASERVE_PREFILL_CHUNK_TOKENS: '16' } });
      eos = JSON.parse(await readFile(join(f.dir, 'config.json'), 'utf8')).eos_token_id;
      assert.equal((await uploadFolder(stack.services.app, 'lora', f.loraDir)).status, 201);
    });

    test('greedy ids equal PyTorch\'s, bare and with the LoRA, one request at a time', async () => {
      for (const p of f.prompts) {
        assert.deepEqual(await streamedIds(stack.services.app, null, p.text, f.maxNewTokens), untilEos(p.bare, eos), `${p.text} bare`);
        assert.deepEqual(await streamedIds(stack.services.app, 'lora', p.text, f.maxNewTokens), untilEos(p.lora, eos), `${p.text} lora`);
      }
    });

    test('greedy ids equal PyTorch\'s in one mixed batch', async () => {
      const before = await batchSizes(stack.services.app);
      const runs = f.prompts.flatMap((p) => [
        streamedIds(stack.services.app, null, p.text, f.maxNewTokens).then((ids) => [ids, untilEos(p.bare, eos), `${p.text} bare`] as const),
        streamedIds(stack.services.app, 'lora', p.text, f.maxNewTokens).then((ids) => [ids, untilEos(p.lora, eos), `${p.text} lora`] as const),
      ]);
      for (const [got, want, what] of await Promise.all(runs)) assert.deepEqual(got, want, what);
      const after = await batchSizes(stack.services.app);
      assert.ok(after.steps - before.steps > after.single - before.single, 'some engine steps ran more than one row');
    });

    test('a request may use the whole context, and its ids equal PyTorch\'s', async () => {
      const { text, prompt_ids: prompt, lora } = f.fullContext;
      const room = f.maxPositions - prompt.length;
      const res = await request(stack.services.app).post('/v1/generate')
        .send({ task: 'lora', inputs: text, parameters: { max_new_tokens: room } });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(res.body.details.prompt_tokens, prompt.length);
      if (!lora) {
        assert.ok(res.body.details.generated_tokens >= 1);
        return;
      }
      assert.equal(lora.length, room);
      const want = untilEos(lora, eos);
      assert.equal(res.body.details.generated_tokens, want.length);
      if (want.length === room) {
        assert.equal(res.body.details.finish_reason, 'length');
        assert.equal(res.body.details.prompt_tokens + res.body.details.generated_tokens, f.maxPositions, 'every position used');
      }
      assert.deepEqual(await streamedIds(stack.services.app, 'lora', text, room), want);
    });

    test('close', async () => stack.close());
  });
}
