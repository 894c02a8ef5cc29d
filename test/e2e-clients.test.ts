/**
 * The JavaScript clients people already use, from npm, against a real
 * listening server on loopback over the real stack: @huggingface/inference
 * (pointed at the server with endpointUrl, the task in adapter_id or model),
 * the Vercel AI SDK (`ai` with @ai-sdk/openai-compatible, a task as the
 * model) and `openai`. Each selects two different tasks and the bare
 * backbone, sampling with a seed, and must produce exactly the text that
 * POST /v1/generate gives for the same task, prompt and seed.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import { InferenceClient, InferenceClientProviderApiError } from '@huggingface/inference';
import { generateText, streamText } from 'ai';
import OpenAI from 'openai';
import { chatTemplateFromTokenizerConfig } from '../src/http/chat-template.js';
import { listenOn, peftLora, startStack, uploadDelta, type Listening, type Stack } from './helpers/e2e-stack.js';

const N = 12;
const TEMPERATURE = 0.9;
const SEED = 7;
const PROMPT = 'The weather today';
const MESSAGES = [{ role: 'system' as const, content: 'You are terse.' }, { role: 'user' as const, content: 'Say something.' }];

describe('e2e: @huggingface/inference, the AI SDK and openai select tasks and agree with /v1/generate', () => {
  let stack: Stack;
  let server: Listening;
  let backbone: string;
  /** The two tasks and the bare backbone (its own name). */
  let selections: string[];
  let chatPrompt: string;

  before(async () => {
    stack = await startStack();
    server = await listenOn(stack.services.app);
    const info = stack.services.backbone.info;
    backbone = info.name;
    for (const [id, seed] of [['task-a', 21], ['task-b', 22]] as const) {
      assert.equal((await uploadDelta(server.url, id, peftLora(info, seed, { bScale: 1 }))).status, 201);
    }
    selections = ['task-a', 'task-b', backbone];
    const tokenizerConfig = JSON.parse(readFileSync(join(stack.services.backbone.source.dir, 'tokenizer_config.json'), 'utf8'));
    chatPrompt = chatTemplateFromTokenizerConfig(tokenizerConfig).render(MESSAGES);
  });
  after(async () => {
    await server?.close();
    await stack?.close();
  });

  /** POST /v1/generate's text for a task (the backbone's name runs it bare), sampled at TEMPERATURE with SEED. */
  async function reference(task: string, inputs: string, stop?: string[]): Promise<string> {
    const res = await fetch(`${server.url}/v1/generate`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ task, inputs, parameters: { max_new_tokens: N, temperature: TEMPERATURE, seed: SEED, stop } }),
    });
    assert.equal(res.status, 200);
    return ((await res.json()) as { generated_text: string }).generated_text;
  }

  test('the selections give three different texts (so agreeing with /v1/generate means the right task ran)', async () => {
    const texts = await Promise.all(selections.map((s) => reference(s, PROMPT)));
    assert.equal(new Set(texts).size, 3, JSON.stringify(texts));
  });

  describe('@huggingface/inference with endpointUrl', () => {
    let hf: InferenceClient;
    before(() => {
      hf = new InferenceClient();
    });

    test('textGeneration: the task in parameters.adapter_id (the model it sends is the endpoint URL)', async () => {
      for (const task of selections) {
        const out = await hf.textGeneration({
          endpointUrl: server.url, inputs: PROMPT,
          parameters: { adapter_id: task, max_new_tokens: N, temperature: TEMPERATURE, seed: SEED },
        });
        assert.equal(out.generated_text, await reference(task, PROMPT), task);
      }
    });

    test('textGenerationStream: OpenAI completion chunks from /v1/completions, joined', async () => {
      for (const task of selections) {
        let text = '';
        const stream = hf.textGenerationStream({
          endpointUrl: `${server.url}/v1`, inputs: PROMPT,
          parameters: { adapter_id: task, max_new_tokens: N, temperature: TEMPERATURE, seed: SEED },
        });
        // 4.x yields what the server sends: at /v1/completions, OpenAI's chunks (as TGI's own server does).
        for await (const chunk of stream as AsyncIterable<unknown> as AsyncIterable<{ choices: { text: string }[] }>) text += chunk.choices[0]?.text ?? '';
        assert.equal(text, await reference(task, PROMPT), task);
      }
    });

    test('chatCompletion: the task in adapter_id, or as the model', async () => {
      const requests = [{ adapter_id: 'task-a' }, { model: 'task-b' }, { model: backbone }];
      for (const [i, selection] of requests.entries()) {
        const out = await hf.chatCompletion({
          endpointUrl: server.url, messages: MESSAGES, max_tokens: N, temperature: TEMPERATURE, seed: SEED, ...selection,
        });
        assert.equal(out.choices[0].message.content, await reference(selections[i], chatPrompt), JSON.stringify(selection));
      }
    });

    test('without adapter_id or model the request is refused, not served bare', async () => {
      // The client's own message is generic for OpenAI-shaped errors; the server's is in the response it keeps.
      await assert.rejects(
        hf.textGeneration({ endpointUrl: server.url, inputs: PROMPT, parameters: { max_new_tokens: 2 } }),
        (e: InferenceClientProviderApiError) => e.httpResponse.status === 422 &&
          /is a URL, not a task.*adapter_id/.test((e.httpResponse.body as { error: { message: string } }).error.message),
      );
    });
  });

  describe('the AI SDK (ai + @ai-sdk/openai-compatible), a task as the model', () => {
    let provider: ReturnType<typeof createOpenAICompatible>;
    /** What the SDK sent: its completion model writes the prompt as a transcript with a stop string of its own. */
    let sent: { prompt?: string; stop?: string[] };
    before(() => {
      provider = createOpenAICompatible({
        name: 'deltaserve', baseURL: `${server.url}/v1`,
        fetch: (async (url: string, init: RequestInit) => {
          sent = JSON.parse(init.body as string);
          return fetch(url, init);
        }) as typeof fetch,
      });
    });
    const settings = { system: MESSAGES[0].content, prompt: MESSAGES[1].content, temperature: TEMPERATURE, seed: SEED, maxOutputTokens: N, maxRetries: 0 };
    /** The completion model's text for `task` equals /v1/generate's on the very prompt and stop strings the SDK sent. */
    const completionReference = (task: string) => reference(task, sent.prompt!, sent.stop);

    test('generateText with a completion model and a chat model', async () => {
      for (const task of selections) {
        const completion = await generateText({ model: provider.completionModel(task), ...settings });
        assert.equal(completion.text, await completionReference(task), task);
        const chat = await generateText({ model: provider.chatModel(task), ...settings });
        assert.equal(chat.text, await reference(task, chatPrompt), `${task} (chat)`);
      }
    });

    test('streamText with a completion model and a chat model', async () => {
      for (const task of selections) {
        const completion = streamText({ model: provider.completionModel(task), ...settings });
        assert.equal(await completion.text, await completionReference(task), task);
        const chat = streamText({ model: provider.chatModel(task), ...settings });
        assert.equal(await chat.text, await reference(task, chatPrompt), `${task} (chat)`);
      }
    });
  });

  describe('openai', () => {
    let client: OpenAI;
    before(() => {
      client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 });
    });
    const settings = { max_tokens: N, temperature: TEMPERATURE, seed: SEED };

    test('completions and chat completions, plain and streamed', async () => {
      for (const model of selections) {
        const completion = await client.completions.create({ model, prompt: PROMPT, ...settings });
        assert.equal(completion.choices[0].text, await reference(model, PROMPT), model);
        const chat = await client.chat.completions.create({ model, messages: MESSAGES, ...settings });
        assert.equal(chat.choices[0].message.content, await reference(model, chatPrompt), `${model} (chat)`);
        let streamed = '';
        for await (const chunk of await client.chat.completions.create({ model, messages: MESSAGES, ...settings, stream: true })) {
          streamed += chunk.choices[0]?.delta.content ?? '';
        }
        assert.equal(streamed, chat.choices[0].message.content, `${model} (chat, streamed)`);
      }
    });
  });
});
