/**
 * Reading weights back out of a model file: BitFit deltas are stored as the
 * difference to the backbone's own bias, so biasOf must return the bytes the
 * file holds, wherever protobuf placed them (rawData is often unaligned).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { demoWeights } from '../src/backbone/demo/build.js';
import { DEMO_SPECS } from '../src/backbone/demo/spec.js';
import { demo } from './helpers/engine-graph.js';

test('biasOf returns every module bias exactly as the demo generator made it', async () => {
  const { bb } = await demo('demo:gpt2');
  const weights = demoWeights(DEMO_SPECS['demo:gpt2']);
  const withBias = bb.info.modules.filter((m) => m.biasInitializer);
  assert.ok(withBias.length >= 16, `GPT-2's linears have biases (found ${withBias.length})`);
  for (const m of withBias) {
    const read = bb.info.biasOf(m.name)!;
    const made = weights(`${m.name}.bias`, m.outFeatures, 'bias');
    assert.equal(read.length, m.outFeatures, m.name);
    assert.deepEqual(Array.from(read), Array.from(made), m.name);
  }
});
