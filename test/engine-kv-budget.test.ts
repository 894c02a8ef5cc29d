/**
 * The KV budget (DELTASERVE_KV_CACHE_BYTES): a request is admitted only while
 * the prompt + max_new_tokens of every running request fit, so the cache never
 * outgrows the budget; the others wait their turn and all complete.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { generate, params, prompt, startStack, type Stack } from './helpers/engine-stack.js';

let stack: Stack;
let tokenBytes: number;

before(async () => {
  // demo:llama: 4 layers × K and V × 2 KV heads × 32 dims × 4 bytes per token.
  tokenBytes = 2 * 4 * 2 * 32 * 4;
  // Room for one full context (1024 tokens) and a bit: the minimum, so at most one 600-token request runs.
  stack = await startStack('demo:llama', { DELTASERVE_KV_CACHE_BYTES: String(1100 * tokenBytes), DELTASERVE_MAX_BATCH: '8' });
});
after(() => stack?.close());

test('requests whose reservations do not fit together run one after another, and all complete', async () => {
  const { io } = stack.services.backbone;
  assert.equal(2 * io.layers * io.kvHeads * io.headDim * 4, tokenBytes, 'the test\'s bytes per token match the backbone');
  const mark = stack.steps.mark();
  // Each reserves ~20 prompt tokens + 580 new ones = ~600 of the 1100-token budget.
  const runs = await Promise.all([0, 1, 2].map((i) => generate(stack.services, null, prompt(20, i), params({ maxNewTokens: 580 }))));
  const steps = stack.steps.since(mark);
  assert.ok(steps.every((s) => s.rows.length <= 1), `at most one request in the engine at a time (saw ${Math.max(...steps.map((s) => s.rows.length))})`);
  for (const r of runs) assert.equal(r.result.generatedTokens, 580);
});

test('small requests that fit together share the batch', async () => {
  const mark = stack.steps.mark();
  const runs = await Promise.all([0, 1, 2, 3].map((i) => generate(stack.services, null, prompt(10, i), params({ maxNewTokens: 40 }))));
  const steps = stack.steps.since(mark);
  assert.ok(Math.max(...steps.map((s) => s.rows.length)) >= 3, 'requests within the budget run together');
  for (const r of runs) assert.equal(r.result.generatedTokens, 40);
});
