import assert from 'node:assert/strict';
import { test } from 'node:test';
import request from 'supertest';
import { ServeError } from '../src/errors.js';
import { testApp } from './helpers/http-app.js';

const noStack = (body: unknown) => assert.doesNotMatch(JSON.stringify(body), /at .+\.(ts|js):\d+/);

test('unknown route: 404 in the contract shape', async () => {
  const res = await request(testApp().app).get('/v1/nope');
  assert.equal(res.status, 404);
  assert.deepEqual(Object.keys(res.body.error).sort(), ['code', 'message']);
  assert.equal(res.body.error.code, 'not_found');
  assert.match(res.body.error.message, /GET \/v1\/nope/);
});

test('malformed JSON: 400 bad_request, no stack trace', async () => {
  const res = await request(testApp().app).post('/v1/generate').set('content-type', 'application/json').send('{"inputs": ');
  assert.equal(res.status, 400);
  assert.equal(res.body.error.code, 'bad_request');
  assert.match(res.body.error.message, /not valid JSON/);
  noStack(res.body);
});

test('malformed JSON on an OpenAI route: 400 in OpenAI shape', async () => {
  const res = await request(testApp().app).post('/v1/chat/completions').set('content-type', 'application/json').send('nope');
  assert.equal(res.status, 400);
  assert.deepEqual(Object.keys(res.body.error).sort(), ['code', 'message', 'param', 'type']);
  assert.equal(res.body.error.type, 'invalid_request_error');
  assert.equal(res.body.error.code, 'bad_request');
});

test('body over DELTASERVE_MAX_BODY_BYTES: 413 payload_too_large', async () => {
  const { app } = testApp({ env: { DELTASERVE_MAX_BODY_BYTES: '100' } });
  const res = await request(app).post('/v1/generate').send({ inputs: 'x'.repeat(200) });
  assert.equal(res.status, 413);
  assert.equal(res.body.error.code, 'payload_too_large');
  assert.match(res.body.error.message, /100 bytes/);
});

test('no JSON body at all: 400 saying to send JSON', async () => {
  const res = await request(testApp().app).post('/v1/generate').set('content-type', 'text/plain').send('hello');
  assert.equal(res.status, 400);
  assert.match(res.body.error.message, /Content-Type: application\/json/);
});

test('schema errors name the field and what is expected', async () => {
  const { app } = testApp();
  let res = await request(app).post('/v1/generate').send({ inputs: 'hi', parameters: { top_p: 3 } });
  assert.equal(res.status, 400);
  assert.match(res.body.error.message, /^parameters\.top_p: /);
  assert.match(res.body.error.message, /1/);
  res = await request(app).post('/v1/generate').send({ parameters: { max_new_tokens: 'ten' } });
  assert.equal(res.status, 400);
  assert.match(res.body.error.message, /inputs: /);
  assert.match(res.body.error.message, /parameters\.max_new_tokens: .*number/);
  assert.equal(res.body.error.details.length, 2);
});

test('a malformed task id is 400 with the rule', async () => {
  const res = await request(testApp().app).post('/v1/generate').send({ task: '../etc', inputs: 'x' });
  assert.equal(res.status, 400);
  assert.match(res.body.error.message, /^task: expected a task id/);
});

test('a ServeError with retryAfter sets Retry-After; details are passed through', async () => {
  const fail = new ServeError(429, 'queue_full', 'the queue is full', undefined, 2.2);
  const res = await request(testApp({ echo: { fail } }).app).post('/v1/generate').send({ inputs: 'x' });
  assert.equal(res.status, 429);
  assert.equal(res.headers['retry-after'], '3');
  assert.deepEqual(res.body, { error: { code: 'queue_full', message: 'the queue is full' } });

  const refused = new ServeError(422, 'invalid_delta', 'delta refused', ['a: bad', 'b: worse']);
  const r2 = await request(testApp({ echo: { fail: refused } }).app).post('/v1/generate').send({ inputs: 'x' });
  assert.equal(r2.status, 422);
  assert.deepEqual(r2.body.error.details, ['a: bad', 'b: worse']);
});

test('an unexpected exception is a 500 without its message or stack', async () => {
  const fail = new Error('secret internal detail') as ServeError;
  const res = await request(testApp({ echo: { fail } }).app).post('/v1/generate').send({ inputs: 'x' });
  assert.equal(res.status, 500);
  assert.equal(res.body.error.code, 'internal_error');
  assert.doesNotMatch(JSON.stringify(res.body), /secret internal detail/);
  noStack(res.body);
});

test('responses carry a request id, echoing a sane incoming one', async () => {
  const { app } = testApp();
  const given = await request(app).get('/healthz').set('x-request-id', 'abc-123');
  assert.equal(given.headers['x-request-id'], 'abc-123');
  const made = await request(app).get('/healthz').set('x-request-id', 'bad id with spaces');
  assert.match(made.headers['x-request-id'], /^[0-9a-f-]{36}$/);
});
