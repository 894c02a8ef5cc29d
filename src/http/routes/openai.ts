/**
 * OpenAI-compatible completions, chat completions and model listing. `model`
 * is a task id or the backbone's name, or TGI/LoRAX's `adapter_id` names the
 * task. One choice per request (n = 1); logprobs as OpenAI shapes them.
 */
import { randomUUID } from 'node:crypto';
import { Router, type Request, type Response } from 'express';
import type { BackboneInfo } from '../../backbone/types.js';
import type { DeltaRegistry } from '../../deltas/types.js';
import type { FinishReason, GenerationResult, SamplingParams, TokenEvent } from '../../engine/types.js';
import { ServeError } from '../../errors.js';
import type { ChatMessage, ChatTemplate } from '../chat-template.js';
import { errorBody, toServeError } from '../errors.js';
import { admit, runGeneration, samplingParams, selectTask, type GenerationDeps, type Run } from '../generation.js';
import type { Readiness } from '../lifecycle.js';
import { chatLogprobs, completionLogprobs, textLength } from '../openai-logprobs.js';
import { chatBody, completionBody, MAX_PAGE, pageQuery, parseBody, TASK_ID, type ChatBody, type CompletionBody } from '../schemas.js';
import { SseStream } from '../sse.js';

/** OpenAI's documented default for the legacy completions endpoint. */
const DEFAULT_COMPLETION_TOKENS = 16;

export interface OpenAIRouteDeps extends GenerationDeps {
  backbone: BackboneInfo;
  registry: DeltaRegistry;
  readiness: Readiness;
  chatTemplate: ChatTemplate;
}

const invalid = (message: string) => new ServeError(422, 'invalid_request', message);

/** Refuses what we would otherwise silently ignore, naming the way out. */
function refuseUnsupported(b: CompletionBody | ChatBody): void {
  if ((b.n ?? 1) !== 1) throw invalid(`n must be 1: deltaserve returns one choice per request; send ${b.n} requests instead`);
  if (b.frequency_penalty || b.presence_penalty) {
    throw invalid('frequency_penalty and presence_penalty are not supported; use repetition_penalty (e.g. 1.1) instead');
  }
  if (b.logit_bias && Object.keys(b.logit_bias).length) throw invalid('logit_bias is not supported');
}

function sampling(b: CompletionBody | ChatBody, maxNewTokens: number): SamplingParams {
  return samplingParams({
    maxNewTokens,
    // OpenAI's default temperature is 1 (sampling), unlike /v1/generate's greedy default.
    temperature: b.temperature ?? 1,
    topP: b.top_p,
    topK: b.top_k,
    repetitionPenalty: b.repetition_penalty,
    seed: b.seed,
    stop: typeof b.stop === 'string' ? [b.stop] : b.stop,
  });
}

const finishReason = (r: FinishReason) => (r === 'length' ? 'length' : 'stop');

const usage = (r: GenerationResult) => ({
  prompt_tokens: r.promptTokens,
  completion_tokens: r.generatedTokens,
  total_tokens: r.promptTokens + r.generatedTokens,
});

const messageText = (content: ChatBody['messages'][number]['content']) =>
  typeof content === 'string' ? content : (content ?? []).map((p) => p.text).join('');

interface Shape {
  object: string;
  idPrefix: string;
  /** A choice carrying the whole text (non-streamed). */
  full(text: string, finish: string, logprobs: unknown): Record<string, unknown>;
  /** A streamed chunk's choice; `text` null = the closing chunk. */
  chunk(text: string | null, finish: string | null, logprobs: unknown): Record<string, unknown>;
  /** Chat streams open with the assistant's role. */
  opening: Record<string, unknown> | null;
  /** The choice's `logprobs` for these tokens; `offset`: characters of the text before the first. */
  logprobs(tokens: TokenEvent[], offset: number): unknown;
}

const completionShape: Shape = {
  object: 'text_completion',
  idPrefix: 'cmpl-',
  full: (text, finish, logprobs) => ({ index: 0, text, logprobs, finish_reason: finish }),
  chunk: (text, finish, logprobs) => ({ index: 0, text: text ?? '', logprobs, finish_reason: finish }),
  opening: null,
  logprobs: completionLogprobs,
};

const chatShape: Shape = {
  object: 'chat.completion',
  idPrefix: 'chatcmpl-',
  full: (text, finish, logprobs) => ({ index: 0, message: { role: 'assistant', content: text }, logprobs, finish_reason: finish }),
  chunk: (text, finish, logprobs) => ({ index: 0, delta: text === null ? {} : { content: text }, logprobs, finish_reason: finish }),
  opening: { index: 0, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null },
  logprobs: chatLogprobs,
};

export function openaiRoutes(deps: OpenAIRouteDeps): Router {
  const router = Router();
  const gate = admit(deps.readiness);

  async function respond(req: Request, res: Response, b: CompletionBody | ChatBody, shape: Shape, run: Run) {
    req.log.debug({ task: run.task, promptChars: run.prompt.length, params: run.params }, shape.object);
    const id = shape.idPrefix + randomUUID().replaceAll('-', '');
    const created = Math.floor(Date.now() / 1000);
    // The task that ran (a client may have named it by adapter_id, with its endpoint's URL as the model).
    const head = { id, object: shape.object, created, model: run.task ?? deps.backbone.name };
    const wantLogprobs = run.logprobs !== undefined;

    if (!b.stream) {
      const tokens: TokenEvent[] = [];
      const r = await runGeneration(deps, res, { ...run, onToken: wantLogprobs ? (t) => tokens.push(t) : undefined });
      const logprobs = wantLogprobs ? shape.logprobs(tokens, 0) : null;
      res.json({ ...head, choices: [shape.full(r.generatedText, finishReason(r.finishReason), logprobs)], usage: usage(r) });
      return;
    }

    const includeUsage = b.stream_options?.include_usage === true;
    const chunkHead = { ...head, object: shape === chatShape ? 'chat.completion.chunk' : 'text_completion' };
    const send = (choices: unknown[], extra: Record<string, unknown> = {}) =>
      sse.send({ ...chunkHead, choices, ...(includeUsage ? { usage: null } : {}), ...extra });
    const sse = new SseStream(res);
    let opened = false;
    /** What the chunks sent so far hold: UTF-16 units (to find the held-back rest), characters (logprobs' offsets). */
    let sentUnits = 0;
    let sentChars = 0;
    const open = () => {
      if (!opened && shape.opening) send([shape.opening]);
      opened = true;
    };
    try {
      const r = await runGeneration(deps, res, {
        ...run,
        onToken: (t) => {
          open();
          // An empty piece (half of a multi-byte character) is no news to an OpenAI client, unless it wants the token's logprobs.
          if (!t.text && !wantLogprobs) return;
          send([shape.chunk(t.text, null, wantLogprobs ? shape.logprobs([t], sentChars) : null)]);
          sentUnits += t.text.length;
          sentChars += textLength(t.text);
        },
      });
      open();
      // Text held back until the end (bytes of an unfinished character, a possible stop string's start).
      const rest = r.generatedText.slice(sentUnits);
      if (rest) send([shape.chunk(rest, null, null)]);
      send([shape.chunk(null, finishReason(r.finishReason), null)]);
      if (includeUsage) send([], { usage: usage(r) });
      sse.done();
      sse.end();
    } catch (err) {
      if (!sse.started) throw err;
      sse.send(errorBody(toServeError(err), 'openai'));
      sse.done();
      sse.end();
    }
  }

  const taskOf = (b: CompletionBody | ChatBody) =>
    selectTask(deps.backbone, { field: 'model', value: b.model, required: true }, { field: 'adapter_id', value: b.adapter_id });

  router.post('/v1/completions', gate, async (req, res) => {
    const b = parseBody(completionBody, req.body);
    refuseUnsupported(b);
    if (b.echo) throw invalid('echo is not supported');
    if ((b.best_of ?? 1) !== 1) throw invalid('best_of must be 1');
    if (b.suffix) throw invalid('suffix (insertion) is not supported');
    const task = taskOf(b);
    const prompt = typeof b.prompt === 'string' ? b.prompt : b.prompt[0];
    await respond(req, res, b, completionShape, {
      task, prompt, params: sampling(b, b.max_tokens ?? DEFAULT_COMPLETION_TOKENS), ...(b.logprobs != null ? { logprobs: b.logprobs } : {}),
    });
  });

  router.post('/v1/chat/completions', gate, async (req, res) => {
    const b = parseBody(chatBody, req.body);
    refuseUnsupported(b);
    if (b.tools?.length) throw invalid('tools (function calling) are not supported');
    if (b.response_format && b.response_format.type !== 'text') throw invalid('response_format must be {"type":"text"}');
    if (b.top_logprobs && b.logprobs !== true) throw invalid('top_logprobs needs "logprobs": true');
    const task = taskOf(b);
    const messages: ChatMessage[] = b.messages.map((m) => ({
      role: m.role,
      content: messageText(m.content),
      ...(m.name ? { name: m.name } : {}),
    }));
    const prompt = deps.chatTemplate.render(messages);
    // OpenAI's chat default is "until the context is full".
    const room = deps.backbone.maxPositions - deps.generator.countTokens(prompt);
    const max = b.max_completion_tokens ?? b.max_tokens ?? Math.max(1, room);
    await respond(req, res, b, chatShape, { task, prompt, params: sampling(b, max), ...(b.logprobs ? { logprobs: b.top_logprobs ?? 0 } : {}) });
  });

  const backboneCard = () => ({
    id: deps.backbone.name,
    object: 'model',
    created: startedAt,
    owned_by: 'deltaserve',
    root: deps.backbone.name,
    parent: null,
    max_model_len: deps.backbone.maxPositions,
  });
  const startedAt = Math.floor(Date.now() / 1000);
  const deltaCard = (d: { id: string; createdAt: string }) => ({
    id: d.id,
    object: 'model',
    created: Math.floor(Date.parse(d.createdAt) / 1000) || startedAt,
    owned_by: 'deltaserve',
    root: d.id,
    parent: deps.backbone.name,
    max_model_len: deps.backbone.maxPositions,
  });

  // OpenAI's own list is one page, and its clients read it whole: without `limit` every model is
  // listed (from the registry's index, so no manifest is read); with it, pages as /v1/deltas does.
  router.get('/v1/models', async (req, res) => {
    // The backbone's name (first on the first page) may be a page's last_id without being a task id.
    const afterBackbone = req.query.after === deps.backbone.name;
    const q = parseBody(pageQuery, afterBackbone ? { ...req.query, after: undefined } : req.query);
    if (q.limit === undefined && q.after === undefined && !afterBackbone) {
      const deltas = await deps.registry.list();
      return void res.json({ object: 'list', data: [backboneCard(), ...deltas.map(deltaCard)] });
    }
    // The backbone comes first and takes one place on the first page.
    const first = q.after === undefined && !afterBackbone;
    const page = await deps.registry.page({ limit: (q.limit ?? MAX_PAGE) - (first ? 1 : 0), after: q.after });
    const data = [...(first ? [backboneCard()] : []), ...page.records.map(deltaCard)];
    res.json({ object: 'list', data, first_id: data[0]?.id ?? null, last_id: data.at(-1)?.id ?? null, has_more: page.hasMore });
  });

  router.get('/v1/models/*id', async (req, res) => {
    const id = ([] as string[]).concat(req.params.id).join('/');
    if (id === deps.backbone.name) return void res.json(backboneCard());
    const d = TASK_ID.test(id) ? await deps.registry.get(id) : null;
    if (!d) throw new ServeError(404, 'task_not_found', `the model \`${id}\` does not exist; GET /v1/models lists them`);
    res.json(deltaCard(d));
  });

  return router;
}
