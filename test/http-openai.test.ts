import assert from 'node:assert/strict';
import { test } from 'node:test';
import OpenAI from 'openai';
import request from 'supertest';
import { listen, sseData, testApp } from './helpers/http-app.js';

const withTask = () => {
  const t = testApp();
  t.registry.records.set('sql', { id: 'sql', createdAt: '2024-01-02T03:04:05.000Z' } as never);
  return t;
};

test('completion: OpenAI shape, usage filled, model selects the task', async () => {
  const { app, generator } = withTask();
  const res = await request(app).post('/v1/completions').send({ model: 'sql', prompt: 'abcdef', max_tokens: 4, temperature: 0.5, stop: 'zz', seed: 7 });
  assert.equal(res.status, 200);
  assert.match(res.body.id, /^cmpl-/);
  assert.equal(res.body.object, 'text_completion');
  assert.equal(res.body.model, 'sql');
  assert.equal(typeof res.body.created, 'number');
  assert.deepEqual(res.body.choices, [{ index: 0, text: 'abcd', logprobs: null, finish_reason: 'length' }]);
  assert.deepEqual(res.body.usage, { prompt_tokens: 6, completion_tokens: 4, total_tokens: 10 });
  assert.equal(generator.requests[0].task, 'sql');
  assert.deepEqual(generator.requests[0].params, {
    maxNewTokens: 4, temperature: 0.5, topK: 0, topP: 1, repetitionPenalty: 1, seed: 7, stop: ['zz'],
  });
});

test('OpenAI defaults: temperature 1, 16 tokens for completions; the backbone name runs no delta', async () => {
  const { app, generator } = testApp();
  await request(app).post('/v1/completions').send({ model: 'test-backbone', prompt: 'x' }).expect(200);
  assert.equal(generator.requests[0].task, null);
  assert.equal(generator.requests[0].params.temperature, 1);
  assert.equal(generator.requests[0].params.maxNewTokens, 16);
});

test('chat: messages rendered with the chat template; max_completion_tokens wins; finish_reason stop', async () => {
  const { app, generator } = withTask();
  const res = await request(app).post('/v1/chat/completions').send({
    model: 'sql',
    messages: [{ role: 'system', content: 'S' }, { role: 'user', content: [{ type: 'text', text: 'hi' }] }],
    max_tokens: 5, max_completion_tokens: 500,
  });
  assert.equal(res.status, 200);
  const prompt = '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n';
  assert.equal(generator.requests[0].prompt, prompt);
  assert.equal(generator.requests[0].params.maxNewTokens, 500);
  assert.equal(res.body.object, 'chat.completion');
  assert.deepEqual(res.body.choices[0].message, { role: 'assistant', content: prompt });
  assert.equal(res.body.choices[0].finish_reason, 'stop');
  assert.equal(res.body.usage.total_tokens, res.body.usage.prompt_tokens + res.body.usage.completion_tokens);
});

test('chat without a token limit gets the rest of the context', async () => {
  const { app, generator } = testApp();
  await request(app).post('/v1/chat/completions').send({ model: 'test-backbone', messages: [{ role: 'user', content: 'hi' }] }).expect(200);
  const promptLength = Array.from(generator.requests[0].prompt).length;
  assert.equal(generator.requests[0].params.maxNewTokens, 64 - promptLength);
});

test('unsupported parameters are refused with 422 and say what to do', async () => {
  const { app } = testApp();
  const base = { model: 'test-backbone', messages: [{ role: 'user', content: 'x' }] };
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ n: 2 }, /n must be 1/],
    [{ frequency_penalty: 0.5 }, /repetition_penalty/],
    [{ presence_penalty: 1 }, /repetition_penalty/],
    [{ top_logprobs: 2 }, /"logprobs": true/],
    [{ tools: [{ type: 'function' }] }, /tools/],
  ];
  for (const [extra, message] of cases) {
    const res = await request(app).post('/v1/chat/completions').send({ ...base, ...extra });
    assert.equal(res.status, 422, JSON.stringify(extra));
    assert.equal(res.body.error.type, 'invalid_request_error');
    assert.match(res.body.error.message, message);
  }
  const ok = await request(app).post('/v1/chat/completions').send({ ...base, n: 1, frequency_penalty: 0, presence_penalty: 0 });
  assert.equal(ok.status, 200);
  const echo = await request(app).post('/v1/completions').send({ model: 'test-backbone', prompt: 'x', echo: true });
  assert.equal(echo.status, 422);
});

test('unknown model: 404 in OpenAI shape with code model_not_found', async () => {
  const res = await request(testApp().app).post('/v1/chat/completions').send({ model: 'gpt-4', messages: [{ role: 'user', content: 'x' }] });
  assert.equal(res.status, 404);
  assert.deepEqual(Object.keys(res.body.error).sort(), ['code', 'message', 'param', 'type']);
  assert.equal(res.body.error.code, 'model_not_found');
});

test('streamed chat: role chunk, content chunks, finish chunk, usage chunk when asked, then [DONE]', async () => {
  const { app } = testApp();
  const res = await request(app).post('/v1/chat/completions').send({
    model: 'test-backbone', messages: [{ role: 'user', content: 'ab' }], max_tokens: 3, stream: true, stream_options: { include_usage: true },
  });
  assert.equal(res.status, 200);
  const data = sseData(res.text);
  assert.equal(data.at(-1), '[DONE]');
  const chunks = data.slice(0, -1).map((d) => JSON.parse(d));
  assert.ok(chunks.every((c) => c.object === 'chat.completion.chunk' && c.id === chunks[0].id));
  assert.deepEqual(chunks[0].choices[0].delta, { role: 'assistant', content: '' });
  assert.deepEqual(chunks.slice(1, 4).map((c) => c.choices[0].delta.content), ['<', '|', 'i']);
  assert.equal(chunks[4].choices[0].finish_reason, 'length');
  assert.deepEqual(chunks[4].choices[0].delta, {});
  assert.deepEqual(chunks[5].choices, []);
  assert.equal(chunks[5].usage.completion_tokens, 3);
  assert.ok(chunks.slice(0, 5).every((c) => c.usage === null));
});

test('streamed completion without include_usage has no usage field', async () => {
  const res = await request(testApp().app).post('/v1/completions').send({ model: 'test-backbone', prompt: 'abc', stream: true });
  const data = sseData(res.text);
  assert.equal(data.at(-1), '[DONE]');
  const chunks = data.slice(0, -1).map((d) => JSON.parse(d));
  assert.equal(chunks.map((c) => c.choices[0].text).join(''), 'abc');
  assert.ok(chunks.every((c) => !('usage' in c) && c.object === 'text_completion'));
  assert.equal(chunks.at(-1).choices[0].finish_reason, 'stop');
});

test('GET /v1/models lists the backbone and every task, deltas with parent = backbone', async () => {
  const { app } = withTask();
  const res = await request(app).get('/v1/models').expect(200);
  assert.equal(res.body.object, 'list');
  assert.deepEqual(res.body.data.map((m: { id: string }) => m.id), ['test-backbone', 'sql']);
  assert.equal(res.body.data[0].parent, null);
  assert.equal(res.body.data[1].parent, 'test-backbone');
  assert.equal(res.body.data[1].created, Date.parse('2024-01-02T03:04:05.000Z') / 1000);
  assert.equal((await request(app).get('/v1/models/sql').expect(200)).body.id, 'sql');
  const missing = await request(app).get('/v1/models/nope');
  assert.equal(missing.status, 404);
  assert.equal(missing.body.error.code, 'model_not_found');
});

test('the official openai client: completion, chat, streamed chat, models, typed errors', async () => {
  const { app } = withTask();
  const srv = await listen(app);
  try {
    const client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'unused', maxRetries: 0 });
    const completion = await client.completions.create({ model: 'sql', prompt: 'hello', max_tokens: 3 });
    assert.equal(completion.choices[0].text, 'hel');
    assert.equal(completion.usage?.completion_tokens, 3);

    const chat = await client.chat.completions.create({ model: 'sql', messages: [{ role: 'user', content: 'hey' }], max_tokens: 8 });
    assert.equal(chat.choices[0].message.content, '<|im_sta');

    const stream = await client.chat.completions.create({
      model: 'sql', messages: [{ role: 'user', content: 'hey' }], max_tokens: 5, stream: true, stream_options: { include_usage: true },
    });
    let text = '';
    let usage: OpenAI.CompletionUsage | null | undefined;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta.content ?? '';
      usage = chunk.usage ?? usage;
    }
    assert.equal(text, '<|im_');
    assert.equal(usage?.completion_tokens, 5);

    const models = await client.models.list();
    assert.deepEqual(models.data.map((m) => m.id), ['test-backbone', 'sql']);

    await assert.rejects(
      client.chat.completions.create({ model: 'nope', messages: [{ role: 'user', content: 'x' }] }),
      (err: unknown) => err instanceof OpenAI.NotFoundError && (err as InstanceType<typeof OpenAI.NotFoundError>).code === 'model_not_found',
    );
  } finally {
    await srv.close();
  }
});
