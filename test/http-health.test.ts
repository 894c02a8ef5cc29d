import assert from 'node:assert/strict';
import { test } from 'node:test';
import request from 'supertest';
import { TEST_BACKBONE } from './helpers/http-fakes.js';
import { testApp } from './helpers/http-app.js';

test('healthz is always 200; readyz follows readiness', async () => {
  const t = testApp({ ready: false });
  assert.deepEqual((await request(t.app).get('/healthz').expect(200)).body, { status: 'ok' });
  assert.equal((await request(t.app).get('/readyz')).status, 503);
  t.lifecycle.markReady();
  await request(t.app).get('/readyz').expect(200);
  t.lifecycle.startDraining();
  const draining = await request(t.app).get('/readyz');
  assert.equal(draining.status, 503);
  assert.equal(draining.body.status, 'draining');
  await request(t.app).get('/healthz').expect(200);
});

test('before ready, generation is 503 not_ready; while draining, 503 draining with Retry-After, on every generation route', async () => {
  const t = testApp({ ready: false });
  const notReady = await request(t.app).post('/v1/generate').send({ inputs: 'a' });
  assert.equal(notReady.status, 503);
  assert.equal(notReady.body.error.code, 'not_ready');
  t.lifecycle.markReady();
  t.lifecycle.startDraining();
  for (const [path, body] of [
    ['/v1/generate', { inputs: 'a' }],
    ['/v1/completions', { model: 'test-backbone', prompt: 'a' }],
    ['/v1/chat/completions', { model: 'test-backbone', messages: [{ role: 'user', content: 'a' }] }],
  ] as const) {
    const res = await request(t.app).post(path).send(body);
    assert.equal(res.status, 503, path);
    assert.ok(Number(res.headers['retry-after']) > 0);
    assert.equal(res.body.error.code, 'draining');
    if (path !== '/v1/generate') assert.equal(res.body.error.type, 'server_error');
  }
  assert.equal(t.generator.requests.length, 0);
});

test('GET /v1/backbone has the contract shape', async () => {
  const res = await request(testApp().app).get('/v1/backbone').expect(200);
  assert.deepEqual(res.body, {
    name: 'test-backbone',
    family: 'llama',
    fingerprint: TEST_BACKBONE.fingerprint,
    modules: [
      { name: 'model.layers.0.self_attn.q_proj', kind: 'linear', in_features: 16, out_features: 16 },
      { name: 'model.layers.0.self_attn.v_proj', kind: 'linear', in_features: 16, out_features: 8 },
    ],
    default_targets: { lora: ['q_proj', 'v_proj'] },
    chat_template: false,
  });
});

test('GET /metrics serves every contract metric and counts the deltas in the store', async () => {
  const t = testApp();
  t.registry.records.set('a', { id: 'a' } as never);
  t.registry.records.set('b', { id: 'b' } as never);
  const res = await request(t.app).get('/metrics').expect(200);
  assert.match(res.headers['content-type'], /^text\/plain; version=0\.0\.4/);
  assert.match(res.text, /^deltaserve_deltas_registered 2$/m);
  for (const name of ['num_requests_waiting', 'num_requests_running', 'kv_cache_usage_perc', 'lora_requests_info', 'request_duration_seconds',
    'time_to_first_token_seconds', 'time_per_output_token_seconds', 'prompt_tokens_total', 'generated_tokens_total', 'batch_size',
    'delta_cache_hits_total', 'delta_cache_misses_total', 'delta_cache_evictions_total', 'delta_cache_bytes', 'delta_load_seconds', 'deltas_registered']) {
    assert.match(res.text, new RegExp(`^# TYPE deltaserve_${name} `, 'm'), name);
  }
  assert.match(res.text, /^process_resident_memory_bytes /m);
});

test('GET /metrics: deltaserve_draining is 0 while serving and 1 once draining, so a drain that never ends can alert', async () => {
  const t = testApp();
  assert.match((await request(t.app).get('/metrics').expect(200)).text, /^deltaserve_draining 0$/m);
  t.lifecycle.startDraining();
  assert.match((await request(t.app).get('/metrics').expect(200)).text, /^deltaserve_draining 1$/m);
});
