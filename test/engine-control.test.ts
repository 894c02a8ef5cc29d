/**
 * Request control on the real stack (real ORT in the engine worker, real
 * scheduler, real HTTP app): cancellation freeing a row within one engine step
 * (asserted from the engine's own StepResult.rows, not with sleeps), 429 when
 * the queue is full, stop sequences, max_new_tokens, context limits and
 * deadlines.
 *
 * The stack runs with DELTASERVE_MAX_BATCH=4 and DELTASERVE_MAX_QUEUE=4 so that
 * a few requests fill the batch and the queue.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, request as httpRequest, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import request from 'supertest';
import type { StepResult } from '../src/engine/protocol.js';
import { buildEngineGraph } from '../src/backbone/rewrite/index.js';
import { planSites } from '../src/deltas/kinds/index.js';
import { createSession } from '../src/backbone/session.js';
import { Engine } from '../src/engine/engine.js';
import type { Lease } from '../src/deltas/cache.js';
import { ServeError } from '../src/errors.js';
import { generate, mixedTasks, params, prompt, registerDelta, startStack, type Stack } from './helpers/engine-stack.js';

/** Per step: what the engine says it holds, and what the scheduler believes right after handling that step. */
interface Observed {
  step: StepResult;
  schedulerRows: number[];
}

/**
 * The worker's engine built in-process (same graph, CPU session), with leases on `task` and on a second
 * mixed-kind delta, for tests that drive it step by step; everything is released after `body`.
 */
async function withInProcessEngine(stack: Stack, task: string, body: (h: {
  make: () => Engine;
  lease: Lease;
  other: Lease;
  enc: (text: string) => number[];
  greedy: { temperature: number; topK: number; topP: number; repetitionPenalty: number; seed: null };
}) => Promise<void>): Promise<void> {
  const { backbone, registry } = stack.services;
  const graph = buildEngineGraph(backbone, planSites(backbone));
  const session = await createSession(graph.bytes, { ep: 'cpu' });
  const make = () => new Engine(session, backbone.io, graph.sites, {
    maxBatch: 4, prefillChunkTokens: 32, eosTokenIds: backbone.tokenizer.eosTokenIds, maxPositions: backbone.info.maxPositions,
  });
  const lease = await registry.acquire(task);
  const other = await registry.acquire(mixedTasks(backbone.info)[4].id);
  try {
    await body({
      make, lease, other,
      enc: (t) => backbone.tokenizer.encode(t, { addSpecialTokens: true }),
      greedy: { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null },
    });
  } finally {
    lease.release();
    other.release();
    await session.release();
  }
}

/**
 * Watches steps; `onStep` may act synchronously (e.g. abort) between two
 * steps. Registered after the scheduler's own listener, so `schedulerRows` is
 * the scheduler's state once it has processed the step.
 */
function watch(stack: Stack, onStep?: (s: StepResult, index: number) => void) {
  const seen: Observed[] = [];
  const fn = (step: StepResult) => {
    seen.push({ step, schedulerRows: stack.services.scheduler.runningRowIds() });
    onStep?.(step, seen.length - 1);
  };
  stack.services.engine.on('step', fn);
  return { seen, stop: () => stack.services.engine.off('step', fn) };
}

/** The row id a request got: the scheduler admits a bare request synchronously inside generate(). */
function startTracked(stack: Stack, task: string | null, text: string, p: ReturnType<typeof params>, extra: Parameters<typeof generate>[4] = {}) {
  const before = new Set(stack.services.scheduler.runningRowIds());
  const run = generate(stack.services, task, text, p, extra);
  const fresh = stack.services.scheduler.runningRowIds().filter((id) => !before.has(id));
  return { run, rowId: fresh.length === 1 ? fresh[0] : null };
}

/**
 * Step results the worker posted before the cancel may still sit in this
 * thread's message queue when the cancel is sent (this thread was busy). A
 * MessagePort dispatches the messages already queued in one go, so an
 * immediate scheduled at the cancel fires after them: what it counts is the
 * first step that can reflect the cancel.
 */
function afterBacklog(seen: Observed[]): Promise<number> {
  return new Promise((resolve) => setImmediate(() => resolve(seen.length)));
}

/**
 * The row must be gone from the engine within one step of the cancel: of the
 * steps posted after it, at most the one already in flight may still list it;
 * the step that reports it finished (cancelled) no longer holds it, nor does
 * any later one, and the scheduler has let it go by then too.
 */
function assertFreedWithinOneStep(seen: Observed[], fromIndex: number, rowId: number): void {
  const after = seen.slice(fromIndex);
  const firstWithout = after.findIndex((o) => !o.step.rows.includes(rowId));
  assert.ok(firstWithout >= 0, `row ${rowId} was still held ${after.length} steps after its cancel`);
  assert.ok(firstWithout <= 1, `row ${rowId} was still held by ${firstWithout} steps after its cancel (allowed: the one step in flight)`);
  const freeing = after[firstWithout];
  assert.deepEqual(
    freeing.step.finished.filter((f) => f.rowId === rowId).map((f) => f.reason), ['cancelled'],
    'the step that dropped the row did not report it cancelled',
  );
  assert.ok(!freeing.schedulerRows.includes(rowId), 'the scheduler still counted the row as running');
  for (const o of after.slice(firstWithout)) {
    assert.ok(!o.step.rows.includes(rowId), 'the row came back');
    assert.ok(!o.step.tokens.some((t) => t.rowId === rowId), 'a cancelled row produced a token');
  }
}

describe('request control on demo:llama', () => {
  let stack: Stack;
  let task: string;

  before(async () => {
    stack = await startStack('demo:llama', {
      DELTASERVE_MAX_BATCH: '4', DELTASERVE_MAX_QUEUE: '4', DELTASERVE_PREFILL_CHUNK_TOKENS: '32',
    });
    const specs = mixedTasks(stack.services.backbone.info);
    const spec = specs[1];
    await registerDelta(stack, spec);
    await registerDelta(stack, specs[4]);
    task = spec.id;
  });
  after(() => stack?.close());

  test('a cancelled decoding request frees its row within one step, and a queued request takes its place', async () => {
    const others = [0, 1, 2].map((i) => startTracked(stack, null, prompt(10 + i, i), params({ maxNewTokens: 200 })));
    const ctrl = new AbortController();
    const target = startTracked(stack, null, prompt(20, 9), params({ maxNewTokens: 200 }), { signal: ctrl.signal });
    assert.ok(target.rowId !== null, 'the target was not admitted at once');
    // The batch is full (4 rows): this one waits in the queue.
    const waiter = generate(stack.services, null, prompt(12, 5), params({ maxNewTokens: 4 }));
    assert.equal(stack.services.scheduler.waiting, 1);

    let aborted: Promise<number> | null = null;
    let targetTokens = 0;
    const w = watch(stack, (s) => {
      targetTokens += s.tokens.filter((t) => t.rowId === target.rowId).length;
      if (!aborted && targetTokens >= 3) {
        assert.ok(s.rows.includes(target.rowId!), 'the target was not in the engine when cancelled');
        ctrl.abort();
        aborted = afterBacklog(w.seen);
      }
    });
    const r = await target.run;
    assert.ok(r.result.generatedTokens < 200, 'the cancelled request ran to the end');
    const waited = await waiter;
    w.stop();
    assert.ok(aborted, 'never cancelled');
    const abortedAt = await aborted;
    assertFreedWithinOneStep(w.seen, abortedAt, target.rowId!);
    // The freed row was given to the waiting request while the others still ran.
    const admittedAt = w.seen.findIndex((o) => o.step.rows.length === 4 && !o.step.rows.includes(target.rowId!));
    assert.ok(admittedAt >= abortedAt, 'the waiting request never joined the running batch');
    assert.equal(waited.result.generatedTokens, 4);
    for (const o of others) assert.equal((await o.run).result.generatedTokens, 200);
  });

  test('in-process engine: a row cancelled mid-prefill leaves its prefill group at the next step; its group-mate is unaffected', async () => {
    // The worker's engine, built the same way but driven step by step, so "the next step" is exact.
    await withInProcessEngine(stack, task, async ({ make, lease, other, enc, greedy }) => {
      const mateReq = (rowId: number) => ({ rowId, promptIds: enc(prompt(150, 21)), sampling: greedy, maxNewTokens: 10, delta: lease.delta });
      const drain = async (e: Engine, rowId: number) => {
        const tokens: number[] = [];
        for (let n = 0; !e.idle; n++) {
          assert.ok(n < 200, 'the engine never went idle');
          for (const t of (await e.step()).tokens) if (t.rowId === rowId) tokens.push(t.token);
        }
        return tokens;
      };
      const alone = make();
      alone.add(mateReq(1));
      const mateAlone = await drain(alone, 1);
      assert.equal(mateAlone.length, 10);

      const e = make();
      // The target is longer and sits first, so removing it moves the mate's KV row and bank slot.
      e.add({ rowId: 2, promptIds: enc(prompt(300, 22)), sampling: greedy, maxNewTokens: 10, delta: other.delta });
      e.add(mateReq(3));
      for (let i = 0; i < 3; i++) {
        const s = await e.step();
        assert.equal(s.stats.prefillRows, 2, 'the two rows were not prefilled together');
        assert.deepEqual(s.rows.sort(), [2, 3]);
        assert.equal(s.tokens.length, 0);
      }
      e.cancel(2);
      const s = await e.step();
      assert.deepEqual(s.finished, [{ rowId: 2, reason: 'cancelled', generated: 0 }]);
      assert.deepEqual(s.rows, [3], 'the cancelled row was still held after the next step');
      assert.equal(s.stats.prefillRows, 1);
      assert.ok(!s.stats.runningDeltas.includes(other.delta.id), 'the cancelled row\'s delta still counted as running');
      const rest = await drain(e, 3);
      assert.deepEqual([...s.tokens.map((t) => t.token), ...rest], mateAlone, 'the group-mate changed when the target left its prefill group');
    });
  });

  test('in-process engine: a failed run fails exactly its rows (engine_error), frees their KV and bank slices; the rows beside and after it are unchanged', async () => {
    // The fault hook (DELTASERVE_FAULTS=engine-step) feeds the next run of a phase an int32 input_ids: onnxruntime rejects it for real.
    await withInProcessEngine(stack, task, async ({ make, lease, other, enc, greedy }) => {
      const reqA = (rowId: number) => ({ rowId, promptIds: enc(prompt(20, 31)), sampling: greedy, maxNewTokens: 12, delta: lease.delta });
      const reqB = (rowId: number) => ({ rowId, promptIds: enc(prompt(24, 32)), sampling: greedy, maxNewTokens: 12, delta: other.delta });
      const tokensOf = (steps: StepResult[], rowId: number) => steps.flatMap((st) => st.tokens.filter((t) => t.rowId === rowId).map((t) => t.token));
      const drain = async (e: Engine) => {
        const steps: StepResult[] = [];
        for (let n = 0; !e.idle; n++) {
          assert.ok(n < 200, 'the engine never went idle');
          steps.push(await e.step());
        }
        return steps;
      };
      const ref = make();
      ref.add(reqA(1));
      ref.add(reqB(2));
      const refSteps = await drain(ref);
      const refA = tokensOf(refSteps, 1);
      const refB = tokensOf(refSteps, 2);
      assert.equal(refA.length, 12);

      const e = make();
      e.add(reqA(10));
      const first = await e.step();
      assert.ok(tokensOf([first], 10).length >= 1 && first.rows.includes(10), 'row A was not decoding after its prefill');
      // 1. A prefill run fails: only the row it prefills (B) fails; A decodes on in the same step.
      e.injectRunFaults(1, 'prefill');
      e.add(reqB(11));
      const failed = await e.step();
      assert.deepEqual(failed.finished.map((f) => [f.rowId, f.reason]), [[11, 'engine_error']]);
      assert.match(failed.finished[0].error ?? '', /^prefill run failed: .*(int32|int64|type)/i);
      assert.deepEqual(failed.stats.failures.map((f) => [f.phase, f.rows]), [['prefill', 1]]);
      assert.deepEqual(failed.rows, [10], 'the failed row is still held');
      assert.ok(!failed.stats.runningDeltas.includes(other.delta.id), 'the failed row\'s delta still counts as running');
      const restA = await drain(e);
      assert.deepEqual([...tokensOf([first, failed], 10), ...tokensOf(restA, 10)], refA, 'the row beside the failed run changed');
      assert.equal(e.kvBytes + e.bankBytes, 0, 'KV or bank bytes held by an idle engine');

      // 2. A decode run fails: every decoding row fails, and the engine serves the same requests again unchanged.
      e.add(reqA(12));
      e.add(reqB(13));
      await e.step();
      e.injectRunFaults(1, 'decode');
      let s = await e.step();
      while (!s.stats.failures.length) s = await e.step();
      assert.deepEqual(s.stats.failures.map((f) => [f.phase, f.rows]), [['decode', 2]]);
      assert.deepEqual(s.finished.map((f) => [f.rowId, f.reason]).sort(), [[12, 'engine_error'], [13, 'engine_error']]);
      assert.ok(e.idle, 'rows of the failed decode run are still held');
      e.add(reqA(14));
      e.add(reqB(15));
      const again = await drain(e);
      assert.deepEqual(tokensOf(again, 14), refA);
      assert.deepEqual(tokensOf(again, 15), refB);
    });
  });

  test('a client that closes its SSE connection mid-stream frees its row within one step', async () => {
    const server = createServer(stack.services.app).listen(0, '127.0.0.1');
    await once(server, 'listening');
    try {
      const w = watch(stack);
      let closedAt: Promise<number> | null = null;
      // The server side of the socket closing is when the HTTP layer aborts the request.
      server.on('connection', (socket) => socket.on('close', () => (closedAt ??= afterBacklog(w.seen))));
      const before = new Set(stack.services.scheduler.runningRowIds());
      const req = httpRequest({
        host: '127.0.0.1', port: (server.address() as AddressInfo).port, method: 'POST', path: '/v1/generate',
        headers: { 'content-type': 'application/json' },
      });
      req.end(JSON.stringify({ task, inputs: prompt(12, 80), parameters: { max_new_tokens: 400 }, stream: true }));
      const [res] = (await once(req, 'response')) as [IncomingMessage];
      assert.equal(res.statusCode, 200);
      assert.match(String(res.headers['content-type']), /text\/event-stream/);
      await once(res, 'data');
      const fresh = stack.services.scheduler.runningRowIds().filter((id) => !before.has(id));
      assert.equal(fresh.length, 1, `rows running: ${fresh}`);
      const rowId = fresh[0];
      req.on('error', () => {});
      req.destroy();
      const freed = await stack.steps.next((s) => s.finished.some((f) => f.rowId === rowId));
      w.stop();
      assert.ok(closedAt, 'the server never saw the connection close');
      assertFreedWithinOneStep(w.seen, await closedAt, rowId);
      const generated = freed.finished.find((f) => f.rowId === rowId)!.generated;
      assert.ok(generated < 400, `the row ran to the end (${generated} tokens)`);
    } finally {
      server.closeAllConnections();
      server.close();
    }
  });

  test('a request cancelled while queued is refused with 499 and never reaches the engine', async () => {
    const running = [0, 1, 2, 3].map((i) => generate(stack.services, null, prompt(8, i), params({ maxNewTokens: 40 })));
    const ctrl = new AbortController();
    const w = watch(stack);
    const queued = startTracked(stack, null, prompt(8, 7), params({ maxNewTokens: 40 }), { signal: ctrl.signal });
    assert.equal(queued.rowId, null, 'expected the request to wait in the queue');
    assert.equal(stack.services.scheduler.waiting, 1);
    ctrl.abort();
    await assert.rejects(queued.run, (e: unknown) => e instanceof ServeError && e.status === 499 && e.code === 'cancelled');
    assert.equal(stack.services.scheduler.waiting, 0);
    await Promise.all(running);
    w.stop();
    const ids = new Set(w.seen.flatMap((o) => o.step.rows));
    assert.equal(ids.size, 4, `the engine saw rows ${[...ids]}`);
  });

  test('a full queue answers 429 queue_full with Retry-After; the admitted requests all complete', async () => {
    // The first four (admitted at once) run long, so the four behind them are still queued when the HTTP request lands.
    const max = (i: number) => (i < 4 ? 240 : 20);
    const admitted = Array.from({ length: 8 }, (_, i) => generate(stack.services, null, prompt(6 + i, 40 + i), params({ maxNewTokens: max(i) })));
    assert.equal(stack.services.scheduler.runningCount, 4);
    assert.equal(stack.services.scheduler.waiting, 4);
    await assert.rejects(
      generate(stack.services, null, 'one too many', params()),
      (e: unknown) => e instanceof ServeError && e.status === 429 && e.code === 'queue_full' && (e.retryAfter ?? 0) >= 1,
    );
    // Through HTTP: the status, the contract's error body and the Retry-After header.
    const res = await request(stack.services.app).post('/v1/generate').send({ inputs: 'hello', parameters: { max_new_tokens: 4 } });
    assert.equal(res.status, 429, JSON.stringify(res.body));
    assert.equal(res.body.error.code, 'queue_full');
    assert.ok(Number(res.headers['retry-after']) >= 1, `Retry-After: ${res.headers['retry-after']}`);
    assert.equal(stack.services.scheduler.waiting, 4, 'the queue drained before the HTTP request was answered');
    const done = await Promise.all(admitted);
    done.forEach((d, i) => {
      assert.ok(d.result.finishReason === 'length' ? d.result.generatedTokens === max(i) : d.result.finishReason === 'eos_token');
    });
    assert.equal(stack.services.scheduler.waiting, 0);
  });

  test('a stop sequence ends generation with stop_sequence and the stop string left out of the text', async () => {
    const text = prompt(18, 50);
    const full = await request(stack.services.app).post('/v1/generate')
      .send({ task, inputs: text, parameters: { max_new_tokens: 16 } }).expect(200);
    const out: string = full.body.generated_text;
    assert.equal(full.body.details.finish_reason, 'length');
    // A two-character stop string from the middle of the greedy output, whose first occurrence is well inside it.
    let stop = '';
    for (let k = 3; k < out.length - 2 && !stop; k++) {
      const s = out.slice(k, k + 2);
      if (!s.includes('\uFFFD') && out.indexOf(s) >= 3) stop = s;
    }
    assert.ok(stop, `no usable stop string in ${JSON.stringify(out)}`);
    const cut = await request(stack.services.app).post('/v1/generate')
      .send({ task, inputs: text, parameters: { max_new_tokens: 16, stop: [stop, 'never-in-the-output-zzz'] } }).expect(200);
    assert.equal(cut.body.details.finish_reason, 'stop_sequence');
    assert.equal(cut.body.generated_text, out.slice(0, out.indexOf(stop)));
    assert.ok(!cut.body.generated_text.includes(stop));
    assert.ok(cut.body.details.generated_tokens < 16);
    // A stop string that never occurs changes nothing.
    const same = await request(stack.services.app).post('/v1/generate')
      .send({ task, inputs: text, parameters: { max_new_tokens: 16, stop: ['never-in-the-output-zzz'] } }).expect(200);
    assert.equal(same.body.generated_text, out);
    assert.equal(same.body.details.finish_reason, 'length');
  });

  test('max_new_tokens ends with length; a prompt past the context is 422 prompt_too_long; one that fills it gets one token', async () => {
    const res = await request(stack.services.app).post('/v1/generate')
      .send({ task, inputs: prompt(30, 60), parameters: { max_new_tokens: 7 } }).expect(200);
    assert.equal(res.body.details.finish_reason, 'length');
    assert.equal(res.body.details.generated_tokens, 7);

    const ctx = stack.services.backbone.info.maxPositions;
    const tooLong = await request(stack.services.app).post('/v1/generate')
      .send({ inputs: 'x'.repeat(ctx + 20), parameters: { max_new_tokens: 4 } });
    assert.equal(tooLong.status, 422, JSON.stringify(tooLong.body));
    assert.equal(tooLong.body.error.code, 'prompt_too_long');

    // BOS + (ctx - 2) bytes = ctx - 1 tokens: room for exactly one token, however many are asked for.
    const full = await request(stack.services.app).post('/v1/generate')
      .send({ inputs: 'y'.repeat(ctx - 2), parameters: { max_new_tokens: 50 } }).expect(200);
    assert.equal(full.body.details.prompt_tokens, ctx - 1);
    assert.equal(full.body.details.generated_tokens, 1);
    assert.equal(full.body.details.finish_reason, 'length');
  });

  test('a deadline ends a request with length and frees its row', async () => {
    const w = watch(stack);
    const t = startTracked(stack, null, prompt(10, 70), params({ maxNewTokens: 900 }), { deadline: Date.now() + 150 });
    assert.ok(t.rowId !== null);
    const r = await t.run;
    const settledAt = await afterBacklog(w.seen);
    assert.equal(r.result.finishReason, 'length');
    assert.ok(r.result.generatedTokens > 0 && r.result.generatedTokens < 900, `${r.result.generatedTokens} tokens`);
    assert.equal(r.tokens.length, r.result.generatedTokens);
    // The engine lets the row go within a step of the deadline firing.
    if (w.seen.at(-1)?.step.rows.includes(t.rowId!)) await stack.steps.next((s) => !s.rows.includes(t.rowId!));
    w.stop();
    assertFreedWithinOneStep(w.seen, settledAt, t.rowId!);
  });
});
