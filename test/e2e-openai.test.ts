/**
 * The official `openai` npm client against a REAL listening server (serve()
 * on 127.0.0.1, port 0) over the real stack, `model` set to a task: a
 * completion, a chat completion and streamed ones, with text, usage and the
 * stream's end handled by the client itself ([DONE]).
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import OpenAI from 'openai';
import request from 'supertest';
import { serve, type RunningServer } from '../src/http/server.js';
import { createLogger } from '../src/log.js';
import { peftLora, startStack, type Stack } from './helpers/e2e-stack.js';

describe('e2e: the official openai client', () => {
  let stack: Stack;
  let running: RunningServer;
  let client: OpenAI;
  const exits: number[] = [];

  before(async () => {
    stack = await startStack();
    const f = peftLora(stack.services.backbone.info, 11);
    await request(stack.services.app).post('/v1/deltas').field('id', 'openai-task')
      .attach('a', f['adapter_config.json'], 'adapter_config.json').attach('b', f['adapter_model.safetensors'], 'adapter_model.safetensors').expect(201);
    running = await serve(stack.services.app, { host: '127.0.0.1', port: 0, drainSeconds: 5 }, {
      lifecycle: stack.services.lifecycle, logger: createLogger('silent'), signals: [], exit: (c) => exits.push(c),
    });
    client = new OpenAI({ baseURL: `${running.url}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 30_000 });
  });
  after(async () => {
    await running?.shutdown();
    assert.deepEqual(exits, [0]);
    await stack?.close();
  });

  test('models.list names the backbone and the task', async () => {
    const ids = [];
    for await (const m of client.models.list()) ids.push(m.id);
    assert.deepEqual(ids.sort(), ['demo:gpt2', 'openai-task']);
  });

  test('completions.create with model = a task: text, usage, and the task changes the text', async () => {
    const c = await client.completions.create({ model: 'openai-task', prompt: 'The weather today', max_tokens: 12, temperature: 0 });
    assert.equal(c.object, 'text_completion');
    assert.equal(c.model, 'openai-task');
    assert.equal(c.choices.length, 1);
    assert.ok(c.choices[0].text.length > 0, 'text');
    assert.ok(c.usage, 'usage');
    assert.ok(c.usage.prompt_tokens > 0);
    assert.ok(c.usage.completion_tokens >= 1 && c.usage.completion_tokens <= 12);
    assert.equal(c.usage.total_tokens, c.usage.prompt_tokens + c.usage.completion_tokens);
    const bare = await client.completions.create({ model: 'demo:gpt2', prompt: 'The weather today', max_tokens: 12, temperature: 0 });
    assert.notEqual(c.choices[0].text, bare.choices[0].text, 'model selects the task');
  });

  test('chat.completions.create, plain and streamed: text, usage, and the stream ends', async () => {
    const messages = [{ role: 'system' as const, content: 'You are terse.' }, { role: 'user' as const, content: 'Say something.' }];
    const chat = await client.chat.completions.create({ model: 'openai-task', messages, max_tokens: 16, temperature: 0 });
    assert.equal(chat.object, 'chat.completion');
    assert.equal(chat.choices[0].message.role, 'assistant');
    const content = chat.choices[0].message.content ?? '';
    assert.ok(content.length > 0, 'text');
    assert.ok(chat.usage && chat.usage.completion_tokens >= 1 && chat.usage.prompt_tokens > 0);
    assert.ok(['length', 'stop'].includes(chat.choices[0].finish_reason));

    const stream = await client.chat.completions.create({
      model: 'openai-task', messages, max_tokens: 16, temperature: 0, stream: true, stream_options: { include_usage: true },
    });
    let text = '';
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | null | undefined = null;
    let chunks = 0;
    for await (const chunk of stream) {
      chunks++;
      assert.equal(chunk.object, 'chat.completion.chunk');
      assert.equal(chunk.model, 'openai-task');
      for (const choice of chunk.choices) {
        text += choice.delta.content ?? '';
        finish = choice.finish_reason ?? finish;
      }
      if (chunk.usage) usage = chunk.usage;
    }
    // The loop ending at all is the client having seen [DONE] (or the stream closing cleanly).
    assert.ok(chunks >= 3, 'role, content and finish chunks');
    assert.equal(text, content, 'the streamed text is the plain greedy text');
    assert.equal(finish, chat.choices[0].finish_reason);
    assert.deepEqual(usage, chat.usage, 'usage in the final chunk');
  });

  test('a streamed completion through the client yields the same text', async () => {
    const plain = await client.completions.create({ model: 'openai-task', prompt: 'Once', max_tokens: 10, temperature: 0 });
    const stream = await client.completions.create({ model: 'openai-task', prompt: 'Once', max_tokens: 10, temperature: 0, stream: true });
    let text = '';
    for await (const chunk of stream) text += chunk.choices[0]?.text ?? '';
    assert.equal(text, plain.choices[0].text);
    // On the wire: the stream ends with OpenAI's terminator.
    const raw = await fetch(`${running.url}/v1/chat/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'openai-task', messages: [{ role: 'user', content: 'x' }], max_tokens: 3, stream: true }),
    });
    assert.match(raw.headers.get('content-type') ?? '', /^text\/event-stream/);
    assert.ok((await raw.text()).endsWith('data: [DONE]\n\n'));
  });

  test('errors surface as the client\'s typed errors', async () => {
    await assert.rejects(
      client.chat.completions.create({ model: 'no-such-task', messages: [{ role: 'user', content: 'x' }] }),
      (e: unknown) => e instanceof OpenAI.NotFoundError && e.status === 404 && e.code === 'model_not_found',
    );
    await assert.rejects(
      client.completions.create({ model: 'openai-task', prompt: 'x', n: 2 }),
      (e: unknown) => e instanceof OpenAI.UnprocessableEntityError && e.status === 422,
    );
    await assert.rejects(
      client.completions.create({ model: 'bad id!', prompt: 'x' }),
      (e: unknown) => e instanceof OpenAI.BadRequestError && e.status === 400,
    );
  });
});
