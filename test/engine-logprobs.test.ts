/**
 * Logprobs from the engine, checked against an independent computation: a
 * full forward of a separately built model (the original graph for bare rows,
 * the demo rebuilt with the LoRA merged into its weights for the delta row),
 * log-softmaxed in double precision here. Greedy and sampled rows, with and
 * without a delta, asking for different numbers of alternatives, share the
 * batch with a row that asks for none.
 */
import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import type { Backbone } from '../src/backbone/backbone.js';
import { createSession } from '../src/backbone/session.js';
import { Engine } from '../src/engine/engine.js';
import type { TokenLogprobs } from '../src/engine/logprobs.js';
import type { RowRequest } from '../src/engine/protocol.js';
import type { DemoSpec } from '../src/backbone/demo/spec.js';
import {
  defaultGraph, demo, fullForwardLogits, loadCases, logSoftmax, originalSession, referenceSession, tokens, topIds, type KindCase, type Session,
} from './helpers/engine-graph.js';

const TOLERANCE = 1e-4;
const greedy = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null };

let bb: Backbone;
let spec: DemoSpec;
let engine: Engine;
let lora: KindCase;
let bare: Session;

before(async () => {
  ({ bb, spec } = await demo('demo:gpt2'));
  const graph = defaultGraph(bb);
  engine = new Engine(await createSession(graph.bytes), bb.io, graph.sites, {
    maxBatch: 8, prefillChunkTokens: 512, eosTokenIds: [], maxPositions: bb.info.maxPositions,
  });
  [lora] = await loadCases(bb, [{ id: 'lp-lora', kind: 'peft-lora', rank: 4, targets: ['c_attn'], seed: 3 }]);
  bare = await originalSession(bb);
});

interface Generated {
  ids: number[];
  logprobs: (TokenLogprobs | undefined)[];
}

/** Runs rows together until every one is done; each row's tokens and logprobs. */
async function run(rows: Omit<RowRequest, 'rowId'>[]): Promise<Generated[]> {
  const out: Generated[] = rows.map(() => ({ ids: [], logprobs: [] }));
  rows.forEach((r, i) => engine.add({ ...r, rowId: i + 1 }));
  while (!engine.idle) {
    for (const t of (await engine.step()).tokens) {
      out[t.rowId - 1].ids.push(t.token);
      out[t.rowId - 1].logprobs.push(t.logprobs);
    }
  }
  return out;
}

/** Every token's logprob and alternatives equal the reference's log-softmax at its position. */
async function assertMatchesReference(ref: Session, prompt: number[], got: Generated, n: number, greedyRow: boolean) {
  const rows = (await fullForwardLogits(ref, bb.io, prompt, got.ids)).map(logSoftmax);
  rows.forEach((expected, i) => {
    const token = got.ids[i];
    const lp = got.logprobs[i];
    assert.ok(lp, `token ${i} has logprobs`);
    const best = topIds(expected, Math.max(n, 1));
    if (greedyRow) assert.equal(token, best[0], `token ${i} is the reference's argmax`);
    assert.ok(Math.abs(lp.logprob - expected[token]) <= TOLERANCE, `token ${i}: logprob ${lp.logprob} vs reference ${expected[token]}`);
    assert.deepEqual(lp.top.map((t) => t.id), best.slice(0, n), `token ${i}: the ${n} most likely ids`);
    lp.top.forEach((t) => assert.ok(Math.abs(t.logprob - expected[t.id]) <= TOLERANCE, `token ${i}, alternative ${t.id}: ${t.logprob} vs ${expected[t.id]}`));
  });
}

test('logprobs of greedy and sampled rows, bare and with a LoRA, equal the log-softmax of a full forward of the reference model', async () => {
  const prompts = [tokens(5, 1, bb.io.vocabSize), tokens(9, 2, bb.io.vocabSize), tokens(7, 3, bb.io.vocabSize), tokens(6, 4, bb.io.vocabSize)];
  const [bareGreedy, loraGreedy, sampled, silent] = await run([
    { promptIds: prompts[0], sampling: greedy, maxNewTokens: 6, delta: null, logprobs: 5 },
    { promptIds: prompts[1], sampling: greedy, maxNewTokens: 6, delta: lora.delta, logprobs: 3 },
    { promptIds: prompts[2], sampling: { ...greedy, temperature: 1.3, seed: 11 }, maxNewTokens: 6, delta: null, logprobs: 0 },
    { promptIds: prompts[3], sampling: greedy, maxNewTokens: 6, delta: null },
  ]);
  await assertMatchesReference(bare, prompts[0], bareGreedy, 5, true);
  await assertMatchesReference(await referenceSession(spec, lora), prompts[1], loraGreedy, 3, true);
  await assertMatchesReference(bare, prompts[2], sampled, 0, false);
  assert.deepEqual(silent.logprobs, silent.ids.map(() => undefined), 'a row that asks for none gets none');
});

test('asking for logprobs changes no token: the same rows alone, without them, pick the same ids', async () => {
  const prompt = tokens(8, 5, bb.io.vocabSize);
  const sampling = { ...greedy, temperature: 0.8, topP: 0.9, seed: 3 };
  const [withLp] = await run([{ promptIds: prompt, sampling, maxNewTokens: 8, delta: lora.delta, logprobs: 2 }]);
  const [without] = await run([{ promptIds: prompt, sampling, maxNewTokens: 8, delta: lora.delta }]);
  assert.deepEqual(withLp.ids, without.ids);
});
