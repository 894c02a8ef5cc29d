/**
 * TGI's routes and logprobs end to end, on a real listening server over the
 * real stack. Logprobs of greedy tokens, from every route that returns them
 * (/generate's details, /generate_stream's events, OpenAI completions and chat,
 * plain and streamed), equal an independent log-softmax of a full forward of
 * the reference model: the original graph for the bare backbone, the demo
 * rebuilt with the task's LoRA merged into its weights for the task. And TGI's
 * routes sample exactly what /v1/generate samples for the same task and seed.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { buildDemoGraph } from '../src/backbone/demo/build.js';
import { DEMO_SPECS } from '../src/backbone/demo/spec.js';
import { createSession } from '../src/backbone/session.js';
import { chatTemplateFromTokenizerConfig } from '../src/http/chat-template.js';
import { fileBytes } from './helpers/deltas.js';
import { fullForwardLogits, logSoftmax, originalSession, topIds, type Session } from './helpers/engine-graph.js';
import { listenOn, sseData, startStack, uploadDelta, type Listening, type Stack } from './helpers/e2e-stack.js';
import { deltaFiles, encodeTensors, referenceHooks, type TaskSpec } from './helpers/kind-cases.js';

const TOLERANCE = 1e-4;
const N = 8;
const PROMPT = 'Once upon a time';

interface TgiToken {
  id: number;
  text: string;
  logprob: number | null;
  special: boolean;
}

describe('e2e: logprobs against a reference model, and TGI\'s routes', () => {
  let stack: Stack;
  let server: Listening;
  let backbone: string;
  let chatPrompt: string;
  /** Per selection (the backbone's name, a task): the reference model. */
  const references = new Map<string, Session>();

  before(async () => {
    stack = await startStack();
    server = await listenOn(stack.services.app);
    const bb = stack.services.backbone;
    backbone = bb.info.name;
    const spec: TaskSpec = { id: 'lp-task', kind: 'peft-lora', rank: 8, targets: ['c_attn'], seed: 31 };
    const files = deltaFiles(bb.info, spec);
    const upload = Object.fromEntries(Object.entries(encodeTensors(files)).map(([name, content]) => [name, fileBytes(content)]));
    assert.equal((await uploadDelta(server.url, spec.id, upload)).status, 201);
    references.set(backbone, await originalSession(bb));
    references.set(spec.id, await createSession(buildDemoGraph(DEMO_SPECS['demo:gpt2'], referenceHooks(bb.info, spec, files)).encode('ref-lp-task')));
    const tokenizerConfig = JSON.parse(readFileSync(join(bb.source.dir, 'tokenizer_config.json'), 'utf8'));
    chatPrompt = chatTemplateFromTokenizerConfig(tokenizerConfig).render([{ role: 'user', content: 'Tell me a story.' }]);
  });
  after(async () => {
    await server?.close();
    await stack?.close();
  });

  async function post(path: string, body: unknown): Promise<Response> {
    const res = await fetch(`${server.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    assert.equal(res.status, 200, `${path}: ${res.status}`);
    return res;
  }
  const json = async <T>(path: string, body: unknown) => (await (await post(path, body)).json()) as T;
  const events = async <T>(path: string, body: unknown) =>
    sseData(await (await post(path, body)).text()).filter((d) => d !== '[DONE]').map((d) => JSON.parse(d) as T);

  /** The reference's log-softmax at each generated position, for a prompt and the ids generated after it. */
  async function referenceLogprobs(selection: string, prompt: string, ids: number[]): Promise<Float64Array[]> {
    const promptIds = stack.services.backbone.tokenizer.encode(prompt, { addSpecialTokens: true });
    return (await fullForwardLogits(references.get(selection)!, stack.services.backbone.io, promptIds, ids)).map(logSoftmax);
  }

  /** Greedy ids and TGI tokens from /generate with details and top_n_tokens. */
  async function greedyDetails(selection: string, inputs: string) {
    type Details = { tokens: TgiToken[]; top_tokens: TgiToken[][]; finish_reason: string; seed: number | null };
    const r = await json<{ generated_text: string; details: Details }>('/generate', {
      inputs, parameters: { adapter_id: selection, max_new_tokens: N, details: true, top_n_tokens: 5 },
    });
    return { ...r.details, text: r.generated_text, ids: r.details.tokens.map((t) => t.id) };
  }

  const near = (got: number | null, expected: number, what: string) =>
    assert.ok(got !== null && Math.abs(got - expected) <= TOLERANCE, `${what}: ${got} vs reference ${expected}`);

  for (const selection of ['bare', 'task'] as const) {
    const name = () => (selection === 'bare' ? backbone : 'lp-task');

    test(`${selection}: /generate's details — each greedy token is the reference's argmax, its logprob and top 5 the reference's log-softmax`, async () => {
      const d = await greedyDetails(name(), PROMPT);
      assert.equal(d.tokens.length, N);
      assert.equal(d.seed, null, 'greedy: no seed');
      const ref = await referenceLogprobs(name(), PROMPT, d.ids);
      ref.forEach((expected, i) => {
        const best = topIds(expected, 5);
        assert.equal(d.ids[i], best[0], `token ${i} is the reference's argmax`);
        near(d.tokens[i].logprob, expected[d.ids[i]], `token ${i}`);
        assert.deepEqual(d.top_tokens[i].map((t) => t.id), best, `token ${i}: top 5 ids`);
        d.top_tokens[i].forEach((t) => near(t.logprob, expected[t.id], `token ${i}, alternative ${t.id}`));
      });
    });

    test(`${selection}: /generate_stream and OpenAI completions and chat, plain and streamed, carry the same logprobs`, async () => {
      const d = await greedyDetails(name(), PROMPT);
      const ref = await referenceLogprobs(name(), PROMPT, d.ids);
      const streamed = await events<{ token: TgiToken }>('/generate_stream', { inputs: PROMPT, parameters: { adapter_id: name(), max_new_tokens: N, details: true } });
      assert.deepEqual(streamed.map((e) => e.token.id), d.ids);
      streamed.forEach((e, i) => near(e.token.logprob, ref[i][d.ids[i]], `stream token ${i}`));

      const completion = { model: name(), prompt: PROMPT, max_tokens: N, temperature: 0, logprobs: 2 };
      type CompletionLogprobs = { tokens: string[]; token_logprobs: number[]; top_logprobs: Record<string, number>[] };
      const plain = (await json<{ choices: { text: string; logprobs: CompletionLogprobs }[] }>('/v1/completions', completion)).choices[0];
      assert.equal(plain.text, d.text);
      plain.logprobs.token_logprobs.forEach((lp, i) => near(lp, ref[i][d.ids[i]], `completion token ${i}`));
      const chunks = await events<{ choices: { logprobs: CompletionLogprobs | null }[] }>('/v1/completions', { ...completion, stream: true });
      const streamedLps = chunks.flatMap((c) => c.choices[0]?.logprobs?.token_logprobs ?? []);
      assert.equal(streamedLps.length, N, 'one logprob per token, even for tokens that add no text yet');
      streamedLps.forEach((lp, i) => near(lp, ref[i][d.ids[i]], `streamed completion token ${i}`));

      // Chat: the greedy ids of the rendered prompt, read from /generate, against chat's logprobs.
      const c = await greedyDetails(name(), chatPrompt);
      const chatRef = await referenceLogprobs(name(), chatPrompt, c.ids);
      type ChatEntry = { token: string; logprob: number; top_logprobs: { token: string; logprob: number }[] };
      const chat = await json<{ choices: { logprobs: { content: ChatEntry[] } }[] }>('/v1/chat/completions', {
        model: name(), messages: [{ role: 'user', content: 'Tell me a story.' }], max_tokens: N, temperature: 0, logprobs: true, top_logprobs: 3,
      });
      const content = chat.choices[0].logprobs.content;
      assert.equal(content.length, c.ids.length);
      content.forEach((entry, i) => {
        near(entry.logprob, chatRef[i][c.ids[i]], `chat token ${i}`);
        const best = topIds(chatRef[i], 3);
        entry.top_logprobs.forEach((t, j) => near(t.logprob, chatRef[i][best[j]], `chat token ${i}, alternative ${j}`));
      });
    });
  }

  test('TGI\'s /generate, /generate_stream and POST / sample what /v1/generate samples for the same task and seed', async () => {
    const parameters = { adapter_id: 'lp-task', max_new_tokens: 16, temperature: 0.8, top_p: 0.95, seed: 5, details: true };
    const expected = await json<{ generated_text: string; details: { finish_reason: string; generated_tokens: number } }>(
      '/v1/generate', { task: 'lp-task', inputs: PROMPT, parameters: { ...parameters, adapter_id: undefined } });
    const tgi = await json<{ generated_text: string; details: { finish_reason: string; generated_tokens: number; seed: number } }>('/generate', { inputs: PROMPT, parameters });
    assert.equal(tgi.generated_text, expected.generated_text);
    assert.equal(tgi.details.finish_reason, expected.details.finish_reason);
    assert.equal(tgi.details.seed, 5);
    const stream = await events<{ index: number; token: TgiToken; generated_text: string | null; details: { input_length: number } | null }>(
      '/generate_stream', { inputs: PROMPT, parameters });
    assert.deepEqual(stream.map((e) => e.index), stream.map((_, i) => i + 1));
    assert.equal(stream.at(-1)!.generated_text, expected.generated_text);
    assert.equal(stream.map((e) => e.token.text).join(''), expected.generated_text);
    assert.equal(stream.at(-1)!.details!.input_length, stack.services.backbone.tokenizer.encode(PROMPT, { addSpecialTokens: true }).length);
    const compat = await json<{ generated_text: string }>('/', { inputs: PROMPT, parameters });
    assert.equal(compat.generated_text, expected.generated_text);
  });
});
