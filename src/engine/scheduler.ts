/**
 * The scheduler: admission, fairness and per-request bookkeeping on the main
 * thread. Requests wait in one FIFO queue and join the engine's running batch
 * between steps (iteration-level batching, as vLLM and TGI do). A request
 * whose delta is still loading lets those behind it go first, but nothing
 * overtakes a request blocked by a limit (batch rows, distinct deltas, KV
 * and delta-bank budgets): a rare task waits no longer than its place in the queue.
 *
 * Tokens come back from the engine as ids; detokenization and stop strings
 * happen here, so the engine thread only computes.
 */
import type { BackboneTokenizer } from '../backbone/tokenizer.js';
import type { Lease } from '../deltas/cache.js';
import type { LoadedDelta } from '../deltas/types.js';
import { ServeError } from '../errors.js';
import { IncrementalDetokenizer } from './detokenizer.js';
import type { TokenLogprobs } from './logprobs.js';
import type { EngineFinish, RowRequest, StepResult } from './protocol.js';
import { StopSequenceMatcher } from './stop-sequences.js';
import type { FinishReason, GenerateRequest, GenerationResult, Generator, TokenEvent } from './types.js';

/** What the scheduler needs of the engine: the worker client, or an in-process engine in benchmarks. */
export interface EngineHandle {
  add(row: RowRequest): void;
  cancel(rowId: number): void;
  on(event: 'step', fn: (r: StepResult) => void): unknown;
  on(event: 'error', fn: (message: string, rowIds: number[]) => void): unknown;
}

export interface DeltaSource {
  /** Pins the current version of a task's delta; rejects with 404 when it is not registered. */
  acquire(id: string): Promise<Lease>;
  /** True when the task is registered (the store is checked on a miss). */
  exists(id: string): Promise<boolean>;
}

export interface SchedulerMetrics {
  setQueue(waiting: number, running: number): void;
  setKvUsage(fraction: number): void;
  setLoraInfo(maxLora: number, running: Iterable<string>, waiting: Iterable<string>): void;
  observeBatch(rows: number): void;
  observeEngineStep?(stats: StepResult['stats']): void;
}

export interface SchedulerOptions {
  maxBatch: number;
  maxQueue: number;
  /** Distinct deltas in the running batch at once (vLLM's max_loras). */
  maxLoras: number;
  /** Tokens of KV cache the running batch may reserve (prompt + max_new_tokens per row). */
  kvBudgetTokens: number;
  maxPositions: number;
  backboneName: string;
  /** Bytes the delta banks may hold, and what they would hold for a set of rows' deltas. */
  bankBudget?: { bytes: number; of(rows: readonly (LoadedDelta | null)[]): number };
}

interface Entry {
  rowId: number;
  task: string | null;
  promptIds: number[];
  req: GenerateRequest;
  maxNewTokens: number;
  reserve: number;
  lease: Lease | null;
  leaseError: ServeError | null;
  acquiring: boolean;
  onToken?: (t: TokenEvent) => void;
  resolve: (r: GenerationResult) => void;
  reject: (e: unknown) => void;
  detok: IncrementalDetokenizer;
  stops: StopSequenceMatcher;
  text: string;
  generated: number;
  /** Set once the caller has its answer; the engine may still hold the row until it confirms. */
  settled: boolean;
  finishOverride: FinishReason | null;
  timer?: NodeJS.Timeout;
}

const RETRY_AFTER_S = 1;

export class Scheduler implements Generator {
  private readonly queue: Entry[] = [];
  private readonly running = new Map<number, Entry>();
  private nextRowId = 1;
  private reserved = 0;
  /** Ids of tokens that add no text (TGI's `special`). */
  private readonly specialIds: Set<number>;

  constructor(
    private readonly engine: EngineHandle,
    private readonly tokenizer: BackboneTokenizer,
    private readonly deltas: DeltaSource,
    private readonly metrics: SchedulerMetrics,
    private readonly opts: SchedulerOptions,
  ) {
    this.specialIds = new Set([...tokenizer.specialTokens.values(), ...tokenizer.eosTokenIds]);
    engine.on('step', (r) => this.onStep(r));
    engine.on('error', (message, rowIds) => {
      // The rows stay counted as running until the engine confirms they are gone.
      for (const id of rowIds) {
        const e = this.running.get(id);
        if (e) this.fail(e, engineError(message), false);
      }
    });
    this.publish();
  }

  countTokens(text: string): number {
    this.checkLength(text);
    return this.tokenizer.encode(text, { addSpecialTokens: true }).length;
  }

  /**
   * Tokenizing runs on the main thread, in time that grows with the text: a
   * 4 MB prompt would hold every other request (and /healthz) for seconds.
   * No token covers more than maxTokenChars characters, so a text longer than
   * maxPositions × maxTokenChars cannot fit the context whatever it says, and
   * is refused without being tokenized. What is tokenized is therefore at most
   * that long (gpt2: 1024 × 128 characters; the demo backbones: a few KB).
   */
  private checkLength(text: string): void {
    const limit = this.opts.maxPositions * this.tokenizer.maxTokenChars;
    if (text.length > limit) {
      throw new ServeError(422, 'prompt_too_long',
        `the prompt is ${text.length} characters: more than ${this.opts.maxPositions} tokens (the backbone's context) whatever it says, ` +
        `since no token covers more than ${this.tokenizer.maxTokenChars} characters; shorten it to fewer than ${this.opts.maxPositions} tokens`);
    }
  }

  get waiting(): number {
    return this.queue.length;
  }

  get runningCount(): number {
    return this.running.size;
  }

  /** Row ids the engine holds for requests, as of its last step. */
  runningRowIds(): number[] {
    return [...this.running.keys()];
  }

  async generate(req: GenerateRequest, onToken?: (t: TokenEvent) => void): Promise<GenerationResult> {
    const task = req.task === this.opts.backboneName ? null : req.task;
    if (task !== null && !(await this.deltas.exists(task))) {
      throw new ServeError(404, 'task_not_found',
        `unknown task '${task}': register its delta with POST /v1/deltas, or list tasks with GET /v1/deltas`);
    }
    this.checkLength(req.prompt);
    let promptIds = this.tokenizer.encode(req.prompt, { addSpecialTokens: true });
    if (promptIds.length === 0) {
      if (this.tokenizer.bosTokenId === null) throw new ServeError(400, 'bad_request', 'inputs is empty: give a prompt of at least one token');
      promptIds = [this.tokenizer.bosTokenId];
    }
    const room = this.opts.maxPositions - promptIds.length;
    if (room < 1) {
      throw new ServeError(422, 'prompt_too_long',
        `the prompt is ${promptIds.length} tokens and the backbone's context is ${this.opts.maxPositions}: shorten the prompt to at most ${this.opts.maxPositions - 1} tokens`);
    }
    // The limit is on requests that must wait: one that can start now is never refused.
    const canStartNow = this.queue.length === 0 && this.running.size < this.opts.maxBatch;
    if (this.queue.length >= this.opts.maxQueue && !canStartNow) {
      throw new ServeError(429, 'queue_full',
        `${this.queue.length} requests are already waiting (DELTASERVE_MAX_QUEUE=${this.opts.maxQueue}); retry after ${RETRY_AFTER_S}s`,
        undefined, RETRY_AFTER_S);
    }
    if (req.signal?.aborted) throw new ServeError(499 as number, 'cancelled', 'the request was cancelled before it started');
    const maxNewTokens = Math.min(req.params.maxNewTokens, room);
    return new Promise<GenerationResult>((resolve, reject) => {
      const entry: Entry = {
        rowId: this.nextRowId++, task, promptIds, req, maxNewTokens,
        reserve: promptIds.length + maxNewTokens,
        lease: null, leaseError: null, acquiring: false, onToken, resolve, reject,
        detok: new IncrementalDetokenizer(this.tokenizer, { promptIds }),
        stops: new StopSequenceMatcher(req.params.stop),
        text: '', generated: 0, settled: false, finishOverride: null,
      };
      req.signal?.addEventListener('abort', () => this.abort(entry), { once: true });
      if (req.deadline !== undefined) {
        entry.timer = setTimeout(() => this.expire(entry), Math.max(0, req.deadline - Date.now()));
      }
      this.queue.push(entry);
      this.pump();
    });
  }

  /** Admits waiting requests into the running batch, in queue order, while the limits allow. */
  private pump(): void {
    const runningDeltas = new Set([...this.running.values()].map((e) => e.task).filter((t): t is string => t !== null));
    for (let i = 0; i < this.queue.length;) {
      if (this.running.size >= this.opts.maxBatch) break;
      const e = this.queue[i];
      if (e.leaseError) {
        this.queue.splice(i, 1);
        this.fail(e, e.leaseError);
        continue;
      }
      if (e.task !== null && !e.lease) {
        this.startAcquire(e);
        i++;
        continue;
      }
      if (e.task !== null && !runningDeltas.has(e.task) && runningDeltas.size >= this.opts.maxLoras) break;
      if (this.reserved + e.reserve > this.opts.kvBudgetTokens && this.running.size > 0) break;
      if (this.overBankBudget(e)) break;
      this.queue.splice(i, 1);
      this.admit(e);
      if (e.task !== null) runningDeltas.add(e.task);
    }
    // Loads start early for the first requests in line, so a miss is paid while others run.
    for (const e of this.queue.slice(0, this.opts.maxBatch)) if (e.task !== null) this.startAcquire(e);
    this.publish();
  }

  /** Whether the banks with `e`'s row would pass their budget (a row alone is always let in). */
  private overBankBudget(e: Entry): boolean {
    const budget = this.opts.bankBudget;
    if (!budget || this.running.size === 0) return false;
    const rows = [...this.running.values(), e].map((r) => r.lease?.delta ?? null);
    return budget.of(rows) > budget.bytes;
  }

  private startAcquire(e: Entry): void {
    if (e.acquiring || e.lease || e.leaseError) return;
    e.acquiring = true;
    this.deltas.acquire(e.task!).then(
      (lease) => {
        e.acquiring = false;
        if (e.settled) return lease.release();
        e.lease = lease;
        this.countPrefix(e);
        this.pump();
      },
      (err) => {
        e.acquiring = false;
        e.leaseError = err instanceof ServeError
          ? (err.status === 404 ? new ServeError(404, 'task_not_found', `task '${e.task}' was deleted before the request ran`) : err)
          : new ServeError(500, 'internal_error', `loading delta '${e.task}' failed: ${(err as Error).message}`);
        this.pump();
      },
    );
  }

  /**
   * A prompt-learning task's virtual tokens hold KV slots and positions before
   * the prompt: they count in the KV budget and the context, not in the
   * prompt_tokens the user is told.
   */
  private countPrefix(e: Entry): void {
    const virtual = e.lease?.delta.prefix?.tokens ?? 0;
    if (!virtual) return;
    const room = this.opts.maxPositions - virtual - e.promptIds.length;
    if (room < 1) {
      e.leaseError = new ServeError(422, 'prompt_too_long',
        `the prompt is ${e.promptIds.length} tokens, task '${e.task}' puts ${virtual} virtual tokens before it, and the backbone's context is ${this.opts.maxPositions}: shorten the prompt to at most ${this.opts.maxPositions - virtual - 1} tokens`);
      e.lease!.release();
      e.lease = null;
      return;
    }
    e.maxNewTokens = Math.min(e.maxNewTokens, room);
    e.reserve = virtual + e.promptIds.length + e.maxNewTokens;
  }

  private admit(e: Entry): void {
    this.running.set(e.rowId, e);
    this.reserved += e.reserve;
    const p = e.req.params;
    this.engine.add({
      rowId: e.rowId,
      promptIds: e.promptIds,
      sampling: { temperature: p.temperature, topK: p.topK, topP: p.topP, repetitionPenalty: p.repetitionPenalty, seed: p.seed },
      maxNewTokens: e.maxNewTokens,
      delta: e.lease?.delta ?? null,
      logprobs: e.req.logprobs,
    });
  }

  private onStep(r: StepResult): void {
    for (const { rowId, token, logprobs } of r.tokens) {
      const e = this.running.get(rowId);
      if (!e || e.settled) continue;
      e.generated++;
      const { text, stop } = e.stops.push(e.detok.push(token));
      this.deliver(e, token, text, logprobs);
      if (stop !== null) {
        this.settle(e, 'stop_sequence');
        this.engine.cancel(rowId);
      }
    }
    for (const { rowId, reason, error } of r.finished) {
      const e = this.running.get(rowId);
      if (e) {
        this.running.delete(rowId);
        this.reserved -= e.reserve;
        e.lease?.release();
        if (reason === 'non_finite') this.fail(e, nonFinite(e), false);
        else if (reason === 'engine_error') this.fail(e, engineError(error ?? 'unknown'), false);
        else if (!e.settled) this.settle(e, this.finishReason(e, reason));
      }
    }
    this.metrics.observeBatch(r.stats.decodeRows + r.stats.prefillRows);
    this.metrics.observeEngineStep?.(r.stats);
    this.metrics.setKvUsage(Math.min(1, r.stats.kvTokens / this.opts.kvBudgetTokens));
    this.pump();
  }

  private deliver(e: Entry, id: number, text: string, logprobs: TokenLogprobs | undefined): void {
    e.text += text;
    if (!e.onToken) return;
    const event: TokenEvent = { id, text, special: this.specialIds.has(id) };
    if (logprobs) {
      event.logprobs = {
        text: this.tokenText(id), logprob: logprobs.logprob,
        top: logprobs.top.map((t) => ({ id: t.id, text: this.tokenText(t.id), logprob: t.logprob, special: this.specialIds.has(t.id) })),
      };
    }
    e.onToken(event);
  }

  /** A token decoded alone, as logprobs show it. */
  private tokenText(id: number): string {
    return this.tokenizer.decode([id], { skipSpecial: false, cleanUpSpaces: false });
  }

  private finishReason(e: Entry, reason: Exclude<EngineFinish, 'non_finite' | 'engine_error'>): FinishReason {
    if (e.finishOverride) return e.finishOverride;
    return reason === 'cancelled' ? 'length' : reason;
  }

  private settle(e: Entry, reason: FinishReason): void {
    if (e.settled) return;
    e.settled = true;
    clearTimeout(e.timer);
    if (reason !== 'stop_sequence') {
      const tail = e.stops.push(e.detok.flush());
      e.text += tail.text + (tail.stop === null ? e.stops.flush() : '');
      if (tail.stop !== null) reason = 'stop_sequence';
    }
    e.resolve({
      task: e.task,
      generatedText: e.text,
      finishReason: reason,
      generatedTokens: e.generated,
      promptTokens: e.promptIds.length,
    });
  }

  /** Rejects a request; `release` is false while the engine still holds its row (released when it confirms). */
  private fail(e: Entry, err: unknown, release = true): void {
    if (e.settled) return;
    e.settled = true;
    clearTimeout(e.timer);
    if (release) e.lease?.release();
    e.reject(err);
  }

  private abort(e: Entry): void {
    const i = this.queue.indexOf(e);
    if (i >= 0) {
      this.queue.splice(i, 1);
      this.fail(e, new ServeError(499 as number, 'cancelled', 'the client closed the request'));
      this.publish();
    } else if (this.running.has(e.rowId)) {
      e.finishOverride = 'length';
      this.engine.cancel(e.rowId);
    }
  }

  /** A request past its deadline ends with what it has, finish_reason length. */
  private expire(e: Entry): void {
    const i = this.queue.indexOf(e);
    if (i >= 0) {
      this.queue.splice(i, 1);
      e.lease?.release();
      this.settle(e, 'length');
    } else if (this.running.has(e.rowId)) {
      this.settle(e, 'length');
      this.engine.cancel(e.rowId);
    }
  }

  private publish(): void {
    this.metrics.setQueue(this.queue.length, this.running.size);
    const tasks = (entries: Iterable<Entry>) =>
      new Set([...entries].map((e) => e.task).filter((t): t is string => t !== null));
    this.metrics.setLoraInfo(this.opts.maxLoras, tasks(this.running.values()), tasks(this.queue));
  }
}

/** The engine run this request's row was in failed: the server's fault, so a 500 (the request may be retried as it is). */
function engineError(message: string): ServeError {
  return new ServeError(500, 'engine_error', `the engine failed on the batch step running this request (${message}); this is the server's fault, not the request's: retry it`);
}

/** The row's logits were not finite: its delta's weights overflow float32 in this backbone's forward pass. */
function nonFinite(e: Entry): ServeError {
  const at = `at generated token ${e.generated + 1}`;
  return e.task === null
    ? new ServeError(500, 'internal_error', `the backbone produced non-finite logits (NaN or Inf) ${at}; its weights or inputs overflow float32`)
    : new ServeError(422, 'invalid_delta',
      `the delta '${e.task}' produced non-finite logits (NaN or Inf) ${at}: its weights overflow float32 in this backbone's forward pass; ` +
      'replace it (POST /v1/deltas?replace=true) with one whose weights are in a sane range');
}
