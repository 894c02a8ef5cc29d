/**
 * Prefill grouping: rows prefilled together are left-padded to the longest
 * prompt, so a long prompt must not drag short ones through its length.
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
let make: () => Engine;

before(async () => {
  const { bb } = await demo('demo:llama');
  const graph = buildEngineGraph(bb, planSites(bb));
  const session = await createSession(graph.bytes);
  make = () => new Engine(session, bb.io, graph.sites, {
    maxBatch: 8, prefillChunkTokens: 4096, eosTokenIds: [], maxPositions: bb.info.maxPositions,
  });
});

const prompt = (n: number, seed: number) => Array.from({ length: n }, (_, i) => 32 + ((i * 7 + seed) % 90));

async function run(engine: Engine, prompts: number[][]): Promise<{ steps: StepResult[]; tokens: Map<number, number[]> }> {
  const tokens = new Map<number, number[]>();
  prompts.forEach((promptIds, i) => {
    engine.add({ rowId: i, promptIds, sampling: greedy, maxNewTokens: 4, delta: null });
    tokens.set(i, []);
  });
  const steps: StepResult[] = [];
  while (!engine.idle) {
    const r = await engine.step();
    steps.push(r);
    for (const t of r.tokens) tokens.get(t.rowId)!.push(t.token);
  }
  return { steps, tokens };
}

test('a long prompt gets a prefill group of its own; short ones are not padded to it', async () => {
  const prompts = [5, 6, 300, 4].map(prompt);
  const { steps, tokens } = await run(make(), prompts);
  assert.equal(steps[0].stats.prefillRows, 2, 'the two short prompts before the long one go together');
  assert.equal(steps[0].stats.prefillTokens, 2 * 6, 'padded to the longer of the two short prompts only');
  // (Rows that finish prefill also decode in the same step, so each short row has two tokens here.)
  assert.deepEqual([...new Set(steps[0].tokens.map((t) => t.rowId))].sort(), [0, 1], 'only the short rows get tokens in the first step');
  assert.equal(steps[1].stats.prefillRows, 1, 'the long prompt runs alone');
  assert.equal(steps[1].stats.prefillTokens, 300);

  // Grouping changes only the schedule: every row's tokens equal its alone run.
  for (const [i, p] of prompts.entries()) {
    const alone = await run(make(), [p]);
    assert.deepEqual(tokens.get(i), alone.tokens.get(0), `row ${i}`);
  }
});

test('prompts of similar length share one group', async () => {
  const { steps } = await run(make(), [10, 12, 11, 9].map(prompt));
  assert.equal(steps[0].stats.prefillRows, 4);
  assert.equal(steps[0].stats.prefillTokens, 4 * 12);
});
