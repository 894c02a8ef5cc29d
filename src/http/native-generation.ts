/**
 * What /v1/generate and TGI's /generate and /generate_stream share: reading
 * the TGI-style body into a run, and answering it as JSON or as one SSE event
 * per token whose last event also carries the whole text. The routes differ
 * only in their dialect: a default or two, and the shapes they send.
 */
import { randomInt } from 'node:crypto';
import type { Response } from 'express';
import type { BackboneInfo } from '../backbone/types.js';
import type { GenerationResult, TokenEvent } from '../engine/types.js';
import { ServeError } from '../errors.js';
import { errorBody, toServeError } from './errors.js';
import { runGeneration, samplingParams, selectTask, type GenerationDeps, type Run } from './generation.js';
import type { GenerateBody } from './schemas.js';
import { SseStream } from './sse.js';

export interface NativeRun extends Run {
  /** TGI's `details`: every token with its logprob, and the seed. */
  details: boolean;
  /** TGI's `top_n_tokens`: this many alternatives per token. */
  topN: number;
  /** TGI's `return_full_text`: the prompt comes first in generated_text. */
  returnFullText: boolean;
}

type Parameters = NonNullable<GenerateBody['parameters']>;

export interface NativeDialect {
  /** max_new_tokens when the request sets none. */
  defaultMaxNewTokens: number;
  /** Whether a request that sets no temperature samples (at temperature 1). */
  samplesByDefault(p: Parameters): boolean;
  json(run: NativeRun, r: GenerationResult, tokens: TokenEvent[]): unknown;
  /** The SSE event of token number `index` (from 1); the last one (`result` set) also carries the result. */
  event(run: NativeRun, t: TokenEvent | null, index: number, result: GenerationResult | null): unknown;
}

const invalid = (message: string) => new ServeError(422, 'invalid_request', message);

/** TGI parameters we cannot honour, refused unless neutral, each saying what to do instead. */
function refuseUnsupported(p: Parameters): void {
  if ((p.best_of ?? 1) > 1) throw invalid('parameters.best_of must be 1: deltaserve returns one sequence per request; send several requests with different seeds');
  if (p.decoder_input_details) throw invalid('parameters.decoder_input_details is not supported: logprobs are computed for generated tokens only (details: true)');
  if (p.truncate != null) throw invalid('parameters.truncate is not supported: shorten the prompt before sending it');
  if (p.typical_p != null) throw invalid('parameters.typical_p is not supported; use top_p');
  if (p.watermark) throw invalid('parameters.watermark is not supported');
  if (p.frequency_penalty) throw invalid('parameters.frequency_penalty is not supported; use repetition_penalty (e.g. 1.1)');
  if (p.grammar != null) throw invalid('parameters.grammar (constrained generation) is not supported');
}

/** A seed is drawn here when sampling without one, so that TGI's details can say which seed reproduces the text. */
const drawnSeed = () => randomInt(2 ** 48 - 1);

export function nativeRun(body: GenerateBody, backbone: BackboneInfo, dialect: NativeDialect): NativeRun {
  const p = body.parameters ?? {};
  refuseUnsupported(p);
  const task = selectTask(backbone, { field: 'task', value: body.task }, { field: 'parameters.adapter_id', value: p.adapter_id });
  const temperature = p.temperature ?? (p.do_sample || dialect.samplesByDefault(p) ? 1 : 0);
  const params = samplingParams({
    maxNewTokens: p.max_new_tokens ?? dialect.defaultMaxNewTokens,
    temperature,
    topK: p.top_k,
    topP: p.top_p,
    repetitionPenalty: p.repetition_penalty,
    seed: p.seed ?? (temperature > 0 ? drawnSeed() : null),
    stop: p.stop,
  });
  const details = p.details === true;
  const topN = p.top_n_tokens ?? 0;
  return {
    task, prompt: body.inputs, params, details, topN,
    returnFullText: p.return_full_text === true,
    ...(details || topN > 0 ? { logprobs: topN } : {}),
  };
}

/** The text a response carries: the prompt first when return_full_text asked for it. */
export const outputText = (run: NativeRun, r: GenerationResult) => (run.returnFullText ? run.prompt : '') + r.generatedText;

/** The seed that reproduces a sampled text; null for greedy. */
export const usedSeed = (run: NativeRun) => (run.params.temperature > 0 ? run.params.seed : null);

/** A token as TGI shows it; `logprob` null when the request asked for no details. */
export const tgiToken = (t: TokenEvent) => ({ id: t.id, text: t.text, logprob: t.logprobs?.logprob ?? null, special: t.special });

export const tgiTopTokens = (t: TokenEvent) =>
  (t.logprobs?.top ?? []).map((a) => ({ id: a.id, text: a.text, logprob: a.logprob, special: a.special }));

/** Runs a native request and answers it as JSON, or as SSE with `stream`. */
export async function respondNative(deps: GenerationDeps, res: Response, run: NativeRun, dialect: NativeDialect, stream: boolean): Promise<void> {
  if (!stream) {
    const tokens: TokenEvent[] = [];
    const r = await runGeneration(deps, res, { ...run, onToken: run.logprobs === undefined ? undefined : (t) => tokens.push(t) });
    res.json(dialect.json(run, r, tokens));
    return;
  }

  // The last token event must carry generated_text and details (TGI's framing).
  // The scheduler settles a request in the same turn that delivers its last
  // token, so a token is held only until the event loop turns (setImmediate):
  // if the result arrives first, that token was the last one.
  const sse = new SseStream(res);
  // Set in onToken: `as` keeps TypeScript from narrowing it to null past the await.
  let held = null as TokenEvent | null;
  let index = 0;
  /** UTF-16 units of the tokens' texts so far. */
  let received = 0;
  let release: NodeJS.Immediate | undefined;
  const sendHeld = () => {
    if (held) sse.send(dialect.event(run, held, index, null));
    held = null;
  };
  try {
    const r = await runGeneration(deps, res, {
      ...run,
      onToken: (t) => {
        clearImmediate(release);
        sendHeld();
        held = t;
        index++;
        received += t.text.length;
        release = setImmediate(sendHeld);
      },
    });
    clearImmediate(release);
    // Text held back until the end (bytes of an unfinished character, a possible stop string's start)
    // goes with the last token, so that the tokens' texts add up to generated_text.
    const rest = r.generatedText.slice(received);
    const last: TokenEvent | null = held && rest ? { ...held, text: held.text + rest } : held;
    sse.send(dialect.event(run, last, index, r));
    sse.end();
  } catch (err) {
    clearImmediate(release);
    if (!sse.started) throw err;
    sse.send(errorBody(toServeError(err), 'native'));
    sse.end();
  }
}
