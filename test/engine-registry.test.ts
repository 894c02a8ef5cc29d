/**
 * Delta admin while requests stream, on the real stack: the HTTP admin routes
 * over the real registry and store, the real scheduler and engine worker.
 * Registering, replacing and deleting deltas never fails a running request,
 * and each request finishes on the version it started with: its tokens equal
 * that version's output run alone.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import request from 'supertest';
import { ServeError } from '../src/errors.js';
import { generate, params, prompt, registerDelta, startStack, type Run, type Stack } from './helpers/engine-stack.js';
import { deltaFiles, encodeTensors, type TaskSpec } from './helpers/kind-cases.js';

// Long enough that the streams outlast an upload (about 0.1 s here with its fsyncs).
const N = 160;

/** A delta upload as multipart parts, the way a client sends it. */
function upload(stack: Stack, id: string, spec: TaskSpec, replace: boolean) {
  let req = request(stack.services.app).post(`/v1/deltas${replace ? '?replace=true' : ''}`).field('id', id);
  for (const [name, content] of Object.entries(encodeTensors(deltaFiles(stack.services.backbone.info, spec)))) {
    const bytes = content instanceof Uint8Array ? Buffer.from(content) : Buffer.from(JSON.stringify(content));
    req = req.attach(name.replace(/\W/g, '_'), bytes, name);
  }
  return req;
}

/** A streaming request that reports when its first token arrived and whether it is still running. */
function stream(stack: Stack, task: string, text: string) {
  let first!: () => void;
  const started = new Promise<void>((resolve) => (first = resolve));
  const state = { done: false };
  const run = generate(stack.services, task, text, params({ maxNewTokens: N }), { onToken: () => first() })
    .finally(() => (state.done = true));
  return { run, started, state };
}

describe('deltas registered, replaced and deleted while requests stream (demo:llama)', () => {
  let stack: Stack;
  const info = () => stack.services.backbone.info;
  const v1 = (): TaskSpec => ({ id: 'hot', kind: 'peft-lora', rank: 8, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], seed: 31 });
  const v2 = (): TaskSpec => ({ id: 'hot', kind: 'adapter', bottleneck: 16, activation: 'gelu', targets: ['mlp.down_proj', 'self_attn.o_proj'], seed: 32 });
  const fresh = (): TaskSpec => ({ id: 'fresh', kind: 'bitfit', targets: ['o_proj', 'down_proj', 'up_proj'], seed: 33 });

  before(async () => {
    stack = await startStack('demo:llama', { DELTASERVE_MAX_BATCH: '32' });
  });
  after(() => stack?.close());

  test('no request fails; each finishes on its version; after delete new requests get 404 task_not_found', async (t) => {
    assert.ok(info());
    await registerDelta(stack, v1());
    // The new version's reference output, under another id (the id does not enter the computation).
    await registerDelta(stack, v2(), { id: 'ref-v2' });
    const prompts = Array.from({ length: 8 }, (_, i) => prompt(6 + i * 4, 400 + i));
    const alone = async (task: string) => {
      const out: Run[] = [];
      for (const p of prompts) out.push(await generate(stack.services, task, p, params({ maxNewTokens: N })));
      return out;
    };
    const aloneV1 = await alone('hot');
    const aloneV2 = await alone('ref-v2');
    prompts.forEach((_, i) => assert.notDeepEqual(aloneV1[i].tokens, aloneV2[i].tokens, `prompt ${i}: the two versions give the same output`));

    // 8 requests start on version 1.
    const old = prompts.map((p) => stream(stack, 'hot', p));
    await Promise.all(old.map((o) => o.started));

    const t0 = performance.now();
    const replaced = await upload(stack, 'hot', v2(), true);
    t.diagnostic(`replace took ${(performance.now() - t0).toFixed(1)} ms`);
    assert.equal(replaced.status, 201, JSON.stringify(replaced.body));
    const oldStillRunning = old.filter((o) => !o.state.done).length;

    // A new delta registered meanwhile; 8 requests start on version 2 and 2 on the new delta.
    const added = await upload(stack, 'fresh', fresh(), false);
    assert.equal(added.status, 201, JSON.stringify(added.body));
    const next = prompts.map((p) => stream(stack, 'hot', p));
    const onFresh = prompts.slice(0, 2).map((p) => stream(stack, 'fresh', p));
    await Promise.all([...next, ...onFresh].map((o) => o.started));

    await request(stack.services.app).delete('/v1/deltas/hot').expect(204);
    const nextStillRunning = next.filter((o) => !o.state.done).length;
    const gone = await request(stack.services.app).post('/v1/generate').send({ task: 'hot', inputs: 'hello', parameters: { max_new_tokens: 2 } });
    assert.equal(gone.status, 404, JSON.stringify(gone.body));
    assert.equal(gone.body.error.code, 'task_not_found');
    await assert.rejects(generate(stack.services, 'hot', 'hello', params()), (e: unknown) => e instanceof ServeError && e.status === 404 && e.code === 'task_not_found');

    // Every request completes (a rejection fails the test here), on the version it started with.
    const [oldRuns, nextRuns, freshRuns] = await Promise.all([Promise.all(old.map((o) => o.run)), Promise.all(next.map((o) => o.run)), Promise.all(onFresh.map((o) => o.run))]);
    t.diagnostic(`still streaming when the replace returned: ${oldStillRunning}/8; when the delete returned: ${nextStillRunning}/8`);
    prompts.forEach((_, i) => {
      assert.deepEqual(oldRuns[i].tokens, aloneV1[i].tokens, `request ${i} started before the replace did not finish on version 1`);
      assert.deepEqual(nextRuns[i].tokens, aloneV2[i].tokens, `request ${i} started after the replace did not finish on version 2`);
    });
    assert.ok(oldStillRunning > 0, 'every old request had finished before the replace returned: nothing overlapped');
    assert.ok(nextStillRunning > 0, 'every new request had finished before the delete returned: nothing overlapped');
    for (const [i, r] of freshRuns.entries()) {
      const ref = await generate(stack.services, 'fresh', prompts[i], params({ maxNewTokens: N }));
      assert.deepEqual(r.tokens, ref.tokens, `request ${i} on the delta registered mid-stream`);
    }
    const list = await request(stack.services.app).get('/v1/deltas').expect(200);
    assert.deepEqual(list.body.data.map((d: { id: string }) => d.id).sort(), ['fresh', 'ref-v2']);
  });

  test('GET /v1/deltas/{id} shows each delta\'s kind and its sites whatever the kind; a kind this server has no site for is refused with the fix', async () => {
    const kinds: TaskSpec[] = [
      { id: 'c', kind: 'compacter', reductionFactor: 8, n: 4, factorizedPhm: true, factorizedRule: false, activation: 'relu', targets: ['mlp.down_proj'], seed: 41 },
      { id: 'i', kind: 'ia3', targets: ['k_proj', 'down_proj'], feedforward: ['down_proj'], seed: 42 },
      { id: 'p', kind: 'parallel_adapter', bottleneck: 4, scaled: 1, activation: 'silu', targets: ['self_attn.o_proj'], seed: 43 },
      { id: 'l', kind: 'low_rank_adapter', reductionFactor: 8, activation: 'gelu', targets: ['mlp.down_proj'], seed: 45 },
    ];
    for (const spec of kinds) assert.equal((await upload(stack, spec.id, spec, false)).status, 201);
    const sites = async (id: string) => (await request(stack.services.app).get(`/v1/deltas/${id}`).expect(200)).body;
    const c = await sites('c');
    assert.equal(c.type, 'compacter');
    assert.deepEqual(c.sites[0], {
      module: 'model.layers.0.mlp.down_proj', kind: 'compacter', site: 'compacter', shapes: [[32, 4], [16, 16], [16], [16, 16], [4, 32], [128]],
    });
    const i = await sites('i');
    assert.deepEqual(i.sites.map((s: { module: string; site: string; shapes: number[][] }) => [s.module.split('.').slice(-2).join('.'), s.site, s.shapes]).slice(0, 2),
      [['self_attn.k_proj', 'ia3', [[64]]], ['mlp.down_proj', 'ia3', [[352]]]]);
    assert.equal((await sites('p')).sites[0].site, 'adapter');
    // The low-rank adapter's rank-1 factors on its own site: W_left [128, 1], W_right [1, 16] (shown [16]), b [16], then [16, 1], [1, 128], [128].
    assert.deepEqual((await sites('l')).sites[0], {
      module: 'model.layers.0.mlp.down_proj', kind: 'low_rank_adapter', site: 'low_rank_adapter', shapes: [[128, 1], [16], [16], [16, 1], [128], [128]],
    });

    // The default plan puts IA³ sites where PEFT puts IA³ (k_proj, v_proj, down_proj), not on up_proj.
    const res = await upload(stack, 'i-up', { id: 'i-up', kind: 'ia3', targets: ['up_proj'], feedforward: [], seed: 44 }, false);
    assert.equal(res.status, 422);
    assert.equal(res.body.error.code, 'unsupported_delta');
    assert.match(res.body.error.message, /this server has no ia3 delta site on model\.layers\.0\.mlp\.up_proj, .*restart it with DELTASERVE_SITES naming those modules \(e\.g\. ia3:all\)/);
    for (const id of ['c', 'i', 'p', 'l']) await request(stack.services.app).delete(`/v1/deltas/${id}`).expect(204);
  });
});
