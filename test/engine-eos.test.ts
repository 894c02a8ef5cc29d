/**
 * End of sequence: a row whose sampled token is one of the backbone's eos ids
 * finishes with eos_token at once, in prefill or in decode, and frees its row.
 */
import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import { buildEngineGraph } from '../src/backbone/rewrite/index.js';
import { planSites } from '../src/deltas/kinds/index.js';
import { createSession } from '../src/backbone/session.js';
import { Engine } from '../src/engine/engine.js';
import type { StepResult } from '../src/engine/protocol.js';
import { demo } from './helpers/engine-graph.js';

const greedy = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: 1 };
const prompt = [72, 101, 108, 108, 111];
let make: (eos: number[]) => Engine;

before(async () => {
  const { bb } = await demo('demo:llama');
  const graph = buildEngineGraph(bb, planSites(bb));
  const session = await createSession(graph.bytes);
  make = (eos) => new Engine(session, bb.io, graph.sites, {
    maxBatch: 4, prefillChunkTokens: 512, eosTokenIds: eos, maxPositions: bb.info.maxPositions,
  });
});

async function generate(engine: Engine, maxNewTokens: number): Promise<{ tokens: number[]; steps: StepResult[] }> {
  engine.add({ rowId: 1, promptIds: prompt, sampling: greedy, maxNewTokens, delta: null });
  const tokens: number[] = [];
  const steps: StepResult[] = [];
  while (!engine.idle) {
    const r = await engine.step();
    steps.push(r);
    tokens.push(...r.tokens.map((t) => t.token));
  }
  return { tokens, steps };
}

test('the first generated token being eos ends the request in its prefill step', async () => {
  const free = await generate(make([]), 6);
  assert.equal(free.tokens.length, 6);
  const { tokens, steps } = await generate(make([free.tokens[0]]), 6);
  assert.deepEqual(tokens, [free.tokens[0]]);
  assert.deepEqual(steps.at(-1)!.finished, [{ rowId: 1, reason: 'eos_token', generated: 1 }]);
  assert.deepEqual(steps.at(-1)!.rows, [], 'the row is freed');
});

test('an eos met while decoding ends the request there, with the eos counted', async () => {
  const free = await generate(make([]), 6);
  const eos = free.tokens[3];
  const stopAt = free.tokens.indexOf(eos);
  const { tokens, steps } = await generate(make([eos]), 6);
  assert.deepEqual(tokens, free.tokens.slice(0, stopAt + 1));
  assert.equal(steps.at(-1)!.finished[0].reason, 'eos_token');
  assert.equal(steps.at(-1)!.finished[0].generated, stopAt + 1);
});
