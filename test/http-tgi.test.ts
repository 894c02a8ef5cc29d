/**
 * TGI's routes and `adapter_id` at the HTTP layer, over the echo generator:
 * the request each body becomes (task, sampling, logprobs asked), TGI's
 * response and SSE shapes, /info, and every refusal. The numbers themselves
 * (logprobs against a reference model, text equal across routes) are checked
 * end to end in e2e-tgi.test.ts.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import request from 'supertest';
import { sseData, testApp } from './helpers/http-app.js';

const sse = (res: request.Response) => sseData(res.text).filter((d) => d !== '[DONE]').map((d) => JSON.parse(d));

function withTasks(...ids: string[]) {
  const t = testApp();
  for (const id of ids) t.registry.records.set(id, { id } as never);
  return t;
}

test('POST /generate: {generated_text} only, unless details are asked; adapter_id selects the task', async () => {
  const { app, generator } = withTasks('sql');
  const plain = await request(app).post('/generate').send({ inputs: 'abc', parameters: { adapter_id: 'sql', max_new_tokens: 2 } }).expect(200);
  assert.deepEqual(plain.body, { generated_text: 'ab' });
  assert.equal(generator.requests[0].task, 'sql');
  assert.equal(generator.requests[0].logprobs, undefined, 'no details: no logprobs computed');

  const full = await request(app).post('/generate').send({ inputs: 'abc', parameters: { adapter_id: 'sql', details: true, top_n_tokens: 2 } }).expect(200);
  assert.equal(generator.requests[1].logprobs, 2);
  assert.deepEqual(full.body, {
    generated_text: 'abc',
    details: {
      finish_reason: 'eos_token', generated_tokens: 3, seed: null, prefill: [],
      tokens: [...'abc'].map((c) => ({ id: c.codePointAt(0), text: c, logprob: -0.25, special: false })),
      top_tokens: [...'abc'].map(() => [{ id: 97, text: 'a', logprob: -1, special: false }, { id: 98, text: 'b', logprob: -2, special: false }]),
    },
  });
});

test('TGI sampling: do_sample, top_k or top_p sample at temperature 1 with a drawn seed that details report; the default length fills the context', async () => {
  const { app, generator } = testApp();
  await request(app).post('/generate').send({ inputs: 'a' }).expect(200);
  assert.deepEqual(generator.requests[0].params, { maxNewTokens: 64, temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null, stop: [] });
  for (const parameters of [{ do_sample: true }, { top_k: 5 }, { top_p: 0.9 }]) {
    const res = await request(app).post('/generate').send({ inputs: 'a', parameters: { ...parameters, details: true } }).expect(200);
    const params = generator.requests.at(-1)!.params;
    assert.equal(params.temperature, 1, JSON.stringify(parameters));
    assert.ok(Number.isInteger(params.seed), 'a seed is drawn');
    assert.equal(res.body.details.seed, params.seed, 'and reported');
  }
  await request(app).post('/generate').send({ inputs: 'a', parameters: { temperature: 0.5, seed: 9, details: true } })
    .expect(200).expect((r) => assert.equal(r.body.details.seed, 9));
  // /v1/generate keeps the contract: without a temperature it is greedy, whatever top_k says.
  await request(app).post('/v1/generate').send({ inputs: 'a', parameters: { top_k: 5 } }).expect(200);
  assert.equal(generator.requests.at(-1)!.params.temperature, 0);
});

test('return_full_text puts the prompt first', async () => {
  const { app } = testApp();
  const res = await request(app).post('/generate').send({ inputs: 'xy', parameters: { return_full_text: true } }).expect(200);
  assert.equal(res.body.generated_text, 'xyxy');
});

test('POST /generate_stream: TGI events, index from 1, logprob null unless details; the last carries the text and details', async () => {
  const { app } = testApp();
  const bare = sse(await request(app).post('/generate_stream').send({ inputs: 'hé!' }).expect(200));
  assert.deepEqual(bare, [
    { index: 1, token: { id: 104, text: 'h', logprob: null, special: false }, generated_text: null, details: null },
    { index: 2, token: { id: 233, text: 'é', logprob: null, special: false }, generated_text: null, details: null },
    { index: 3, token: { id: 33, text: '!', logprob: null, special: false }, generated_text: 'hé!', details: null },
  ]);
  const detailed = sse(await request(app).post('/generate_stream').send({ inputs: 'ab', parameters: { details: true, top_n_tokens: 1 } }).expect(200));
  assert.deepEqual(detailed.at(-1), {
    index: 2, token: { id: 98, text: 'b', logprob: -0.25, special: false }, top_tokens: [{ id: 97, text: 'a', logprob: -1, special: false }],
    generated_text: 'ab', details: { finish_reason: 'eos_token', generated_tokens: 2, seed: null, input_length: 2 },
  });
});

test('POST / is TGI\'s compat route: JSON, or SSE with "stream": true', async () => {
  const { app } = testApp();
  const json = await request(app).post('/').send({ inputs: 'ab' }).expect(200);
  assert.deepEqual(json.body, { generated_text: 'ab' });
  const stream = await request(app).post('/').send({ inputs: 'ab', stream: true }).expect(200);
  assert.match(stream.headers['content-type'], /^text\/event-stream/);
  assert.equal(sse(stream).at(-1).generated_text, 'ab');
});

test('/v1/generate takes TGI\'s details and adapter_id too, keeping its own shape', async () => {
  const { app, generator } = withTasks('sql');
  const res = await request(app).post('/v1/generate').send({ task: 'sql', inputs: 'ab', parameters: { adapter_id: 'sql', details: true } }).expect(200);
  assert.deepEqual(res.body, {
    task: 'sql', generated_text: 'ab',
    details: {
      finish_reason: 'eos_token', generated_tokens: 2, prompt_tokens: 2, seed: null,
      tokens: [{ id: 97, text: 'a', logprob: -0.25, special: false }, { id: 98, text: 'b', logprob: -0.25, special: false }],
    },
  });
  assert.equal(generator.requests[0].logprobs, 0);
  const events = sse(await request(app).post('/v1/generate').send({ inputs: 'ab', stream: true, parameters: { details: true } }).expect(200));
  assert.deepEqual(events[0], { token: { id: 97, text: 'a', logprob: -0.25, special: false }, generated_text: null });
});

test('adapter_id and the route\'s own field must agree; a Hub repository id is told how to register', async () => {
  const { app } = withTasks('sql', 'chat');
  const cases: [string, Record<string, unknown>, number, RegExp][] = [
    ['/v1/generate', { task: 'sql', inputs: 'a', parameters: { adapter_id: 'chat' } }, 422, /"sql" and parameters\.adapter_id "chat" name different tasks/],
    ['/v1/generate', { task: 'test-backbone', inputs: 'a', parameters: { adapter_id: 'sql' } }, 422, /name different tasks/],
    ['/generate', { inputs: 'a', parameters: { adapter_id: 'predibase/customer_support' } }, 400, /register the adapter with POST \/v1\/deltas/],
    ['/generate', { inputs: 'a', parameters: { adapter_id: 'ghost' } }, 404, /unknown task 'ghost'|ghost/],
  ];
  for (const [path, body, status, message] of cases) {
    const res = await request(app).post(path).send(body);
    assert.equal(res.status, status, JSON.stringify(body));
    assert.match(res.body.error.message, message);
  }
  await request(app).post('/v1/generate').send({ task: 'sql', inputs: 'a', parameters: { adapter_id: 'sql' } }).expect(200);
  await request(app).post('/generate').send({ inputs: 'a', parameters: { adapter_id: 'test-backbone' } }).expect(200);
});

test('TGI parameters deltaserve cannot honour are refused with a 422 that says what to do', async () => {
  const { app } = testApp();
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ best_of: 2 }, /best_of must be 1/],
    [{ decoder_input_details: true }, /generated tokens only/],
    [{ truncate: 10 }, /truncate/],
    [{ typical_p: 0.9 }, /top_p/],
    [{ watermark: true }, /watermark/],
    [{ frequency_penalty: 0.5 }, /repetition_penalty/],
    [{ grammar: { type: 'json', value: {} } }, /grammar/],
  ];
  for (const [parameters, message] of cases) {
    for (const path of ['/generate', '/generate_stream']) {
      const res = await request(app).post(path).send({ inputs: 'a', parameters });
      assert.equal(res.status, 422, `${path} ${JSON.stringify(parameters)}`);
      assert.equal(res.body.error.code, 'invalid_request');
      assert.match(res.body.error.message, message);
    }
  }
  // Neutral values are no request at all.
  await request(app).post('/generate').send({ inputs: 'a', parameters: { best_of: 1, watermark: false, decoder_input_details: false, grammar: null } }).expect(200);
  const tooMany = await request(app).post('/generate').send({ inputs: 'a', parameters: { top_n_tokens: 6 } });
  assert.equal(tooMany.status, 400);
  assert.match(tooMany.body.error.message, /parameters\.top_n_tokens: at most 5/);
});

test('GET /info: what TGI clients read', async () => {
  const { app, config } = testApp();
  const res = await request(app).get('/info').expect(200);
  assert.equal(res.body.model_id, 'test-backbone');
  assert.equal(res.body.max_total_tokens, 64);
  assert.equal(res.body.max_input_tokens, 63);
  assert.equal(res.body.max_input_length, 63);
  assert.equal(res.body.max_best_of, 1);
  assert.equal(res.body.max_stop_sequences, 16);
  assert.equal(res.body.max_concurrent_requests, config.maxBatch + config.maxQueue);
  assert.equal(res.body.router, 'deltaserve');
  assert.match(res.body.version, /^\d+\.\d+\.\d+/);
});

test('OpenAI routes: adapter_id selects the task; a URL model is ignored beside it and refused without it', async () => {
  const { app, generator } = withTasks('sql', 'chat');
  const url = 'http://127.0.0.1:8080';
  const ok = await request(app).post('/v1/completions').send({ model: url, adapter_id: 'sql', prompt: 'ab', max_tokens: 2 }).expect(200);
  assert.equal(generator.requests[0].task, 'sql');
  assert.equal(ok.body.model, 'sql', 'the response names the task that ran');
  await request(app).post('/v1/chat/completions').send({ adapter_id: 'chat', messages: [{ role: 'user', content: 'x' }], max_tokens: 1 }).expect(200);
  assert.equal(generator.requests[1].task, 'chat');
  await request(app).post('/v1/completions').send({ model: 'sql', adapter_id: 'sql', prompt: 'a' }).expect(200);

  const urlOnly = await request(app).post('/v1/completions').send({ model: url, prompt: 'a' });
  assert.equal(urlOnly.status, 422);
  assert.match(urlOnly.body.error.message, /is a URL, not a task.*adapter_id.*"test-backbone"/);
  const disagree = await request(app).post('/v1/chat/completions').send({ model: 'sql', adapter_id: 'chat', messages: [{ role: 'user', content: 'x' }] });
  assert.equal(disagree.status, 422);
  assert.equal(disagree.body.error.type, 'invalid_request_error');
  assert.match(disagree.body.error.message, /model "sql" and adapter_id "chat" name different tasks/);
  const neither = await request(app).post('/v1/completions').send({ prompt: 'a' });
  assert.equal(neither.status, 400);
  assert.match(neither.body.error.message, /model: required/);
  assert.equal(generator.requests.length, 3, 'nothing refused reached the generator');
});

test('OpenAI logprobs: completions\' parallel lists and chat\'s entries, plain and streamed', async () => {
  const { app, generator } = testApp();
  const c = await request(app).post('/v1/completions').send({ model: 'test-backbone', prompt: 'hé', logprobs: 1 }).expect(200);
  assert.equal(generator.requests[0].logprobs, 1);
  assert.deepEqual(c.body.choices[0].logprobs, {
    tokens: ['h', 'é'], token_logprobs: [-0.25, -0.25], text_offset: [0, 1],
    top_logprobs: [{ a: -1, h: -0.25 }, { a: -1, é: -0.25 }],
  });
  const chat = await request(app).post('/v1/chat/completions')
    .send({ model: 'test-backbone', messages: [{ role: 'user', content: 'x' }], logprobs: true, top_logprobs: 1, max_tokens: 1 }).expect(200);
  const entry = chat.body.choices[0].logprobs.content[0];
  assert.equal(chat.body.choices[0].logprobs.refusal, null);
  assert.deepEqual(Object.keys(entry).sort(), ['bytes', 'logprob', 'token', 'top_logprobs']);
  assert.deepEqual(entry.bytes, [...Buffer.from(entry.token)]);
  assert.deepEqual(entry.top_logprobs, [{ token: 'a', logprob: -1, bytes: [97] }]);
  await request(app).post('/v1/chat/completions').send({ model: 'test-backbone', messages: [{ role: 'user', content: 'x' }], logprobs: true }).expect(200);
  assert.equal(generator.requests[2].logprobs, 0, 'logprobs: true alone is the sampled token only');
  await request(app).post('/v1/completions').send({ model: 'test-backbone', prompt: 'x' }).expect(200);
  assert.equal(generator.requests[3].logprobs, undefined);

  const chunks = sse(await request(app).post('/v1/completions').send({ model: 'test-backbone', prompt: 'abc', logprobs: 0, stream: true }).expect(200));
  const tokenChunks = chunks.filter((ch) => ch.choices[0].logprobs);
  assert.deepEqual(tokenChunks.map((ch) => ch.choices[0].logprobs.text_offset), [[0], [1], [2]]);
  assert.deepEqual(tokenChunks.map((ch) => ch.choices[0].logprobs.tokens[0]), ['a', 'b', 'c']);
  const tooMany = await request(app).post('/v1/chat/completions').send({ model: 'test-backbone', messages: [{ role: 'user', content: 'x' }], logprobs: true, top_logprobs: 6 });
  assert.equal(tooMany.status, 400);
  assert.match(tooMany.body.error.message, /top_logprobs: at most 5/);
});
