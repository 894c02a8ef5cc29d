/**
 * Exports whose attention does not read Concat(past, new) the eager way (a
 * grouped-query repeat between them, here an Identity) keep the Concat in the
 * graph: the split is skipped, yet the graph still returns only the new K/V
 * and the engine's generation equals the model's full forward.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { buildEngineGraph } from '../src/backbone/rewrite/index.js';
import { planSites } from '../src/deltas/kinds/index.js';
import { createSession } from '../src/backbone/session.js';
import { Engine } from '../src/engine/engine.js';
import { demo, fullForwardGreedy, originalSession } from './helpers/engine-graph.js';

test('attention that does not match the eager pattern keeps its Concat and stays exact', async () => {
  const { bb } = await demo('demo:gpt2');
  const graph = bb.source.model.graph!;
  // Put an Identity between every present Concat and the nodes that read it.
  const added = [];
  for (let l = 0; l < bb.io.layers; l++) {
    for (const kv of ['key', 'value']) {
      const present = `present.${l}.${kv}`;
      const via = `${present}/repeat`;
      for (const n of graph.node!) {
        if (n.input!.includes(present)) n.input = n.input!.map((i) => (i === present ? via : i));
      }
      added.push({ name: `/test/${present}/Identity`, opType: 'Identity', input: [present], output: [via] });
    }
  }
  const producerIndex = (out: string) => graph.node!.findIndex((n) => n.output!.includes(out));
  for (const node of added) graph.node!.splice(producerIndex(node.input[0]) + 1, 0, node);

  const engineGraph = buildEngineGraph(bb, planSites(bb));
  assert.equal(engineGraph.splitLayers, 0, 'no layer matched the split pattern');
  const engine = new Engine(await createSession(engineGraph.bytes), bb.io, engineGraph.sites, {
    maxBatch: 2, prefillChunkTokens: 4, eosTokenIds: [], maxPositions: bb.info.maxPositions,
  });
  const prompt = bb.tokenizer.encode('fallback path');
  const n = 24;
  engine.add({ rowId: 1, promptIds: prompt, maxNewTokens: n, delta: null, sampling: { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: 0 } });
  const got: number[] = [];
  while (!engine.idle) got.push(...(await engine.step()).tokens.map((t) => t.token));

  assert.deepEqual(got, await fullForwardGreedy(await originalSession(bb), bb.io, prompt, got));
});
