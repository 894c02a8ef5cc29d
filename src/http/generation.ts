/**
 * What the generation routes share: admission while starting or draining,
 * task resolution, and running one request against the generator with
 * cancellation on client disconnect and the request-level metrics.
 */
import { performance } from 'node:perf_hooks';
import type { RequestHandler, Response } from 'express';
import type { BackboneInfo } from '../backbone/types.js';
import type { GenerationResult, Generator, SamplingParams, TokenEvent } from '../engine/types.js';
import { ServeError } from '../errors.js';
import { OTHER_TASK_LABEL, type Metrics } from '../metrics.js';
import { toServeError } from './errors.js';
import type { Readiness } from './lifecycle.js';
import { TASK_ID, TASK_ID_RULE } from './schemas.js';

/** Seconds a refused client should wait: long enough for a load balancer to move it elsewhere. */
const RETRY_AFTER_S = 5;
/** nginx's code for "client closed the request"; there is no standard one. */
const CLIENT_CLOSED = 499;

export function admit(readiness: Readiness): RequestHandler {
  return (_req, _res, next) => {
    if (readiness.draining()) {
      throw new ServeError(503, 'draining', 'the server is shutting down; retry on another replica', undefined, RETRY_AFTER_S);
    }
    if (!readiness.ready()) {
      throw new ServeError(503, 'not_ready', 'the backbone is still loading; retry shortly', undefined, RETRY_AFTER_S);
    }
    next();
  };
}

/** A request naming no task, or the backbone itself, runs the bare backbone (null). */
function resolveTask(name: string | null | undefined, backbone: BackboneInfo, field: string): string | null {
  if (name === null || name === undefined || name === '' || name === backbone.name) return null;
  if (!TASK_ID.test(name)) {
    // LoRAX users name Hub repositories (org/adapter); deltaserve serves what was registered, by id.
    const hub = name.includes('/') ? '; register the adapter with POST /v1/deltas and name it by that id' : '';
    throw new ServeError(400, 'bad_request', `${field}: expected ${TASK_ID_RULE}, or the backbone's name "${backbone.name}"${hub}`);
  }
  return name;
}

/** A field that may name the task, as the request spelled it. */
interface TaskField {
  field: string;
  value: string | null | undefined;
}

/** What @huggingface/inference puts in `model` when given an endpointUrl. A task id holds no ':' or '/', so it is never one. */
const URL = /^[a-z][a-z0-9+.-]*:\/\//i;

const given = (f: TaskField | null) => (f && f.value !== null && f.value !== undefined && f.value !== '' ? f.value : null);

/**
 * The task a request selects. A route names it its own way (`task`, OpenAI's
 * `model`) and TGI/LoRAX's `adapter_id` may name it too; when both are given
 * they must agree. A `model` that is a URL is no task: it is ignored beside an
 * adapter_id and refused without one, never served as the bare backbone.
 * `required`: the route's field or adapter_id must be given (OpenAI's `model`).
 */
export function selectTask(backbone: BackboneInfo, named: (TaskField & { required?: boolean }) | null, adapter: TaskField): string | null {
  const name = given(named);
  const adapterId = given(adapter);
  const isUrl = name !== null && URL.test(name);
  if (adapterId === null) {
    if (isUrl) {
      throw new ServeError(422, 'invalid_request',
        `${named!.field} "${name}" is a URL, not a task (@huggingface/inference sends its endpointUrl there): name the task with ` +
        `${adapter.field} ("parameters": {"adapter_id": "my-task"} with @huggingface/inference), or set ${named!.field} to a task id, ` +
        `or to the backbone's name "${backbone.name}" for the bare backbone`);
    }
    if (name === null && named?.required) {
      throw new ServeError(400, 'bad_request', `${named.field}: required: a task id, or the backbone's name "${backbone.name}" (or name the task with ${adapter.field})`);
    }
    return resolveTask(name, backbone, named?.field ?? adapter.field);
  }
  const task = resolveTask(adapterId, backbone, adapter.field);
  if (name !== null && !isUrl && resolveTask(name, backbone, named!.field) !== task) {
    throw new ServeError(422, 'invalid_request',
      `${named!.field} "${name}" and ${adapter.field} "${adapterId}" name different tasks: send one of them, or the same task in both`);
  }
  return task;
}

/** Sampling parameters with the neutral value for every one a client left out (absent or null). */
export function samplingParams(p: { [K in keyof SamplingParams]?: SamplingParams[K] | null } & { maxNewTokens: number }): SamplingParams {
  return {
    maxNewTokens: p.maxNewTokens,
    temperature: p.temperature ?? 0,
    topK: p.topK ?? 0,
    topP: p.topP ?? 1,
    repetitionPenalty: p.repetitionPenalty ?? 1,
    seed: p.seed ?? null,
    stop: p.stop ?? [],
  };
}

export interface GenerationDeps {
  generator: Generator;
  metrics: Metrics;
}

export interface Run {
  task: string | null;
  prompt: string;
  params: SamplingParams;
  /** Set: each token comes with its logprob and this many alternatives. */
  logprobs?: number;
  onToken?: (t: TokenEvent) => void;
}

/**
 * Runs one generation. A client that goes away aborts the request's signal, so
 * its batch row is freed; the rejection that follows is the caller's to drop.
 */
export async function runGeneration(deps: GenerationDeps, res: Response, run: Run): Promise<GenerationResult> {
  res.locals[OBSERVED] = true;
  const abort = new AbortController();
  const onClose = () => {
    if (!res.writableFinished) abort.abort();
  };
  res.on('close', onClose);
  const start = performance.now();
  let firstToken: number | null = null;
  try {
    const result = await deps.generator.generate(
      { task: run.task, prompt: run.prompt, params: run.params, signal: abort.signal, ...(run.logprobs === undefined ? {} : { logprobs: run.logprobs }) },
      (t) => {
        firstToken ??= performance.now();
        run.onToken?.(t);
      },
    );
    record(deps.metrics, run.task, abort.signal.aborted ? CLIENT_CLOSED : 200, start, firstToken, result);
    return result;
  } catch (err) {
    // Whatever the engine threw on a cancelled row, the cause is the client leaving: not a server error.
    const e = abort.signal.aborted ? new ServeError(CLIENT_CLOSED, 'cancelled', 'the client closed the request') : toServeError(err);
    record(deps.metrics, e.code === 'task_not_found' ? OTHER_TASK_LABEL : run.task, e.status, start, firstToken, null);
    throw e.status === 500 ? err : e;
  } finally {
    res.off('close', onClose);
  }
}

/** Set on a response whose request runGeneration counts (with its task). */
const OBSERVED = 'deltaserveRequestObserved';
const GENERATION_ROUTES = new Set(['/v1/generate', '/v1/completions', '/v1/chat/completions', '/generate', '/generate_stream', '/']);

/**
 * Every answer of a generation route is in deltaserve_request_duration_seconds:
 * those refused before a generation starts (400, 413, 401, 429, 503 …) are
 * counted here, under task "other", when the response closes.
 */
export function countGenerationResponses(metrics: Metrics): RequestHandler {
  return (req, res, next) => {
    if (req.method === 'POST' && GENERATION_ROUTES.has(req.path)) {
      const start = performance.now();
      res.on('close', () => {
        if (!res.locals[OBSERVED]) metrics.observeRequest(OTHER_TASK_LABEL, res.statusCode, (performance.now() - start) / 1000);
      });
    }
    next();
  };
}

function record(metrics: Metrics, task: string | null, status: number, start: number, firstToken: number | null, result: GenerationResult | null) {
  const end = performance.now();
  // observeRequest first: it is what ranks a task into its own label.
  metrics.observeRequest(task, status, (end - start) / 1000);
  if (firstToken !== null) metrics.observeTtft(task, (firstToken - start) / 1000);
  if (!result) return;
  if (firstToken !== null && result.generatedTokens > 1) {
    metrics.observeTpot(task, (end - firstToken) / 1000 / (result.generatedTokens - 1));
  }
  metrics.addTokens(task, result.promptTokens, result.generatedTokens);
}
