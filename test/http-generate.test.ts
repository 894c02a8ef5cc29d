import assert from 'node:assert/strict';
import { request as httpRequest } from 'node:http';
import { test } from 'node:test';
import request from 'supertest';
import { listen, sseData, testApp } from './helpers/http-app.js';

test('JSON generation: contract shape, parameters mapped to SamplingParams', async () => {
  const { app, generator } = testApp();
  const res = await request(app).post('/v1/generate').send({
    inputs: 'hello',
    parameters: { max_new_tokens: 3, temperature: 0.7, top_k: 5, top_p: 0.9, seed: 42, stop: ['zz'], repetition_penalty: 1.2 },
  });
  assert.equal(res.status, 200);
  assert.deepEqual(res.body, {
    task: null,
    generated_text: 'hel',
    details: { finish_reason: 'length', generated_tokens: 3, prompt_tokens: 5 },
  });
  const { signal: _s, ...req } = generator.requests[0];
  assert.deepEqual(req, {
    task: null,
    prompt: 'hello',
    params: { maxNewTokens: 3, temperature: 0.7, topK: 5, topP: 0.9, repetitionPenalty: 1.2, seed: 42, stop: ['zz'] },
  });
});

test('defaults: greedy, no stop, 100 new tokens', async () => {
  const { app, generator } = testApp();
  await request(app).post('/v1/generate').send({ inputs: 'a' }).expect(200);
  assert.deepEqual(generator.requests[0].params, {
    maxNewTokens: 100, temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null, stop: [],
  });
});

test("the backbone's own name runs the bare backbone; a registered task is passed through", async () => {
  const { app, generator, registry } = testApp();
  await request(app).post('/v1/generate').send({ task: 'test-backbone', inputs: 'a' }).expect(200);
  assert.equal(generator.requests[0].task, null);
  registry.records.set('sql', { id: 'sql' } as never);
  const res = await request(app).post('/v1/generate').send({ task: 'sql', inputs: 'a' }).expect(200);
  assert.equal(res.body.task, 'sql');
});

test('unknown task: 404 task_not_found, even when streaming (before any byte is sent)', async () => {
  const { app } = testApp();
  for (const stream of [false, true]) {
    const res = await request(app).post('/v1/generate').send({ task: 'nope', inputs: 'a', stream });
    assert.equal(res.status, 404);
    assert.equal(res.body.error.code, 'task_not_found');
  }
});

test('SSE: one event per token, the last carries generated_text (the concatenation) and details', async () => {
  const { app } = testApp();
  const res = await request(app).post('/v1/generate').send({ inputs: 'héllo wörld', stream: true }).buffer(true).parse((r, cb) => {
    let s = '';
    r.setEncoding('utf8');
    r.on('data', (c: string) => (s += c));
    r.on('end', () => cb(null, s));
  });
  assert.equal(res.status, 200);
  assert.match(res.headers['content-type'], /^text\/event-stream/);
  assert.equal(res.headers['cache-control'], 'no-cache, no-transform');
  const events = sseData(res.body as string).map((d) => JSON.parse(d));
  const last = events.at(-1);
  assert.equal(events.length, last.details.generated_tokens);
  assert.equal(events.length, 11);
  for (const e of events.slice(0, -1)) {
    assert.deepEqual(Object.keys(e).sort(), ['generated_text', 'token']);
    assert.equal(e.generated_text, null);
    assert.equal(typeof e.token.id, 'number');
  }
  assert.equal(events.map((e) => e.token.text).join(''), last.generated_text);
  assert.equal(last.generated_text, 'héllo wörld');
  assert.deepEqual(last.details, { finish_reason: 'eos_token', generated_tokens: 11, prompt_tokens: 11 });
});

test('SSE with a stop sequence reports stop_sequence', async () => {
  const { app } = testApp();
  const res = await request(app).post('/v1/generate').send({ inputs: 'abcdef', stream: true, parameters: { stop: ['cd'] } });
  const events = sseData(res.text).map((d) => JSON.parse(d));
  assert.equal(events.at(-1).details.finish_reason, 'stop_sequence');
  assert.equal(events.at(-1).generated_text, 'abcd');
});

test('a client that disconnects mid-stream aborts its request', async () => {
  const { app, generator } = testApp({ echo: { tokenDelayMs: 20 } });
  const srv = await listen(app);
  try {
    await new Promise<void>((resolve, reject) => {
      const req = httpRequest(`${srv.url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' } }, (res) => {
        res.once('data', () => {
          req.destroy();
          resolve();
        });
      });
      req.on('error', () => {});
      req.end(JSON.stringify({ inputs: 'x'.repeat(60), stream: true }));
      setTimeout(() => reject(new Error('no data')), 5000);
    });
    const deadline = Date.now() + 3000;
    while (generator.aborted.length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    assert.equal(generator.aborted.length, 1);
    assert.equal(generator.requests[0].signal?.aborted, true);
  } finally {
    await srv.close();
  }
});

test('generation requests record request metrics by task', async () => {
  const { app, metrics } = testApp();
  await request(app).post('/v1/generate').send({ inputs: 'abc' }).expect(200);
  await request(app).post('/v1/generate').send({ task: 'ghost', inputs: 'abc' }).expect(404);
  const t = await metrics.render();
  assert.match(t, /deltaserve_request_duration_seconds_count\{task="_base",status="200"\} 1/);
  assert.match(t, /deltaserve_request_duration_seconds_count\{task="other",status="404"\} 1/);
  assert.match(t, /deltaserve_generated_tokens_total\{task="_base"\} 3/);
  assert.match(t, /deltaserve_prompt_tokens_total\{task="_base"\} 3/);
  assert.match(t, /deltaserve_time_to_first_token_seconds_count\{task="_base"\} 1/);
  assert.match(t, /deltaserve_time_per_output_token_seconds_count\{task="_base"\} 1/);
});
