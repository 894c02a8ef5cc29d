/**
 * The engine: one ORT session over the rewritten graph, stepping a batch of
 * rows that each carry their own delta. Each step runs at most one prefill
 * chunk for newly admitted rows and one decode step for the running rows, so a
 * long prompt never stalls the batch for longer than a chunk.
 *
 * Rows, their KV cache and their delta banks' slices live together in a
 * Batch (batch.ts): the decode batch, and the prefill group being prefilled.
 * Where they live, host arrays or device tensors, is the Device's (device/).
 */
import * as ort from 'onnxruntime-node';
import type { DecoderIO } from '../backbone/decoder-io.js';
import type { SiteLayout } from '../backbone/rewrite/delta-sites.js';
import { newKvName } from '../backbone/rewrite/kv-cache.js';
import { GREEDY_TOKEN } from '../backbone/rewrite/last-logits.js';
import { LOGITS_NONFINITE } from '../backbone/rewrite/finite-check.js';
import { LOGPROBS_ON, LOGSUMEXP, TOP_LOGPROB_IDS, TOP_LOGPROBS } from '../backbone/rewrite/logprobs.js';
import { noPromptEmbeds, PROMPT_EMBEDS } from '../backbone/rewrite/prompt-embeds.js';
import type { DeltaPrefix } from '../deltas/types.js';
import { Batch, type BatchRow } from './batch.js';
import { HostDevice } from './device/cpu.js';
import type { Device, HostRows, Transfer } from './device/device.js';
import { tokenLogprobs, type TokenLogprobs } from './logprobs.js';
import type { EngineFinish, RowRequest, RunFailure, RunPhase, StepResult } from './protocol.js';
import { RowSampler } from './sampler.js';

export interface EngineOptions {
  maxBatch: number;
  /** Padded prompt tokens per prefill run; longer prompts are prefilled in chunks. */
  prefillChunkTokens: number;
  eosTokenIds: readonly number[];
  /** The backbone's context length: a row that reaches it finishes with `length`. */
  maxPositions: number;
  /** Whether the provider takes zero-size tensors (an unused LoRA site is then free); see BankOptions. */
  zeroSizeTensors?: boolean;
  /** Where the KV cache and banks live; the host (CPU provider) by default. */
  device?: Device;
}

interface Row {
  req: RowRequest;
  sampler: RowSampler;
  generated: number;
  lastToken: number;
}

/**
 * Rows being prefilled together. Slot layout of row b: its KV prefix (prompt
 * learning; P_b virtual tokens, none for most rows) right-aligned in the first
 * `prefixSlots` slots, then its prompt left-padded to the longest. Prefixes
 * are in place before the first chunk runs, so every real token sees its
 * row's whole prefix; the mask hides both gaps.
 */
interface PrefillGroup {
  batch: Batch<Row>;
  /** Row by row, as the batch's rows move. */
  pads: number[];
  padded: number;
  /** Slots before the prompts, holding the rows' KV prefixes: the longest prefix. */
  prefixSlots: number;
  /** Padded positions already run. */
  done: number;
}

/** Virtual tokens a row's task puts before its prompt (prefix tuning, prompt tuning). */
const prefixTokens = (r: BatchRow) => r.req.delta?.prefix?.tokens ?? 0;

/** Padded tokens a prefill group may run per real prompt token. */
const PADDING_LIMIT = 1.5;

const LOGPROB_OUTPUTS = [TOP_LOGPROBS, TOP_LOGPROB_IDS, LOGSUMEXP];
const LOGPROBS_YES = new ort.Tensor('bool', [true], []);
const LOGPROBS_NO = new ort.Tensor('bool', [false], []);

const i64 = (values: ArrayLike<number>, dims: number[]) =>
  new ort.Tensor('int64', BigInt64Array.from(Array.from(values, (v) => BigInt(v))), dims);

export class Engine {
  private readonly decoding: Batch<Row>;
  private readonly pending: Row[] = [];
  private group: PrefillGroup | null = null;
  private readonly cancelled = new Set<number>();
  private readonly eos: Set<number>;
  /**
   * Outputs a step fetches: all-greedy steps take the in-graph argmax instead of
   * the logits; steps where a row asks for logprobs add the in-graph top-k.
   */
  private readonly kvOutputs: string[];
  private readonly fetches: Record<'greedy' | 'logits', [plain: string[], withLogprobs: string[]]>;
  private readonly device: Device;
  /** The graph's `prompt_embeds` input, fed one zero (no virtual tokens) on every step; null when the graph has none. */
  private readonly noPromptEmbeds: ort.Tensor | null;
  /** Session runs left to sabotage, of one phase or any (the test-only fault hook, DELTASERVE_FAULTS=engine-step). */
  private faults = { runs: 0, phase: 'any' as RunPhase | 'any' };

  constructor(
    private readonly session: ort.InferenceSession,
    private readonly io: DecoderIO,
    private readonly sites: SiteLayout[],
    private readonly opts: EngineOptions,
  ) {
    this.device = opts.device ?? new HostDevice();
    this.decoding = this.newBatch(opts.maxBatch);
    this.eos = new Set(opts.eosTokenIds);
    this.kvOutputs = Array.from({ length: io.layers }, (_, l) => [newKvName(l, 'key'), newKvName(l, 'value')]).flat();
    const fetch = (...pick: string[]) =>
      [[...pick, LOGITS_NONFINITE, ...this.kvOutputs], [...pick, LOGITS_NONFINITE, ...LOGPROB_OUTPUTS, ...this.kvOutputs]] as [string[], string[]];
    // Where the logits stay on a device, greedy rows of a sampling step read the argmax, and only sampling rows' logits come back.
    this.fetches = { greedy: fetch(GREEDY_TOKEN), logits: this.device.logitsOnHost ? fetch('logits') : fetch(GREEDY_TOKEN, 'logits') };
    this.noPromptEmbeds = session.inputNames.includes(PROMPT_EMBEDS) ? noPromptEmbeds() : null;
  }

  private newBatch(maxRows: number): Batch<Row> {
    return new Batch(this.device, this.io, this.sites, { maxRows, zeroSize: this.opts.zeroSizeTensors ?? true, maxTokens: this.opts.maxPositions - 1 });
  }

  add(req: RowRequest): void {
    this.pending.push({ req, sampler: new RowSampler(req.sampling, req.promptIds), generated: 0, lastToken: -1 });
  }

  cancel(rowId: number): void {
    this.cancelled.add(rowId);
  }

  /**
   * The test-only fault hook: the next `runs` session runs get `input_ids` as
   * int32 where the graph takes int64, so onnxruntime itself rejects them, as
   * it would any run that fails (a bad kernel, an allocation that fails).
   */
  injectRunFaults(runs: number, phase: RunPhase | 'any' = 'any'): void {
    this.faults = { runs, phase };
  }

  private sabotage(phase: RunPhase, feeds: Record<string, ort.Tensor>): void {
    if (this.faults.runs === 0 || (this.faults.phase !== 'any' && this.faults.phase !== phase)) return;
    this.faults.runs--;
    const ids = feeds.input_ids;
    feeds.input_ids = new ort.Tensor('int32', Int32Array.from(ids.data as BigInt64Array, Number), ids.dims);
  }

  get idle(): boolean {
    return this.decoding.size === 0 && this.pending.length === 0 && !this.group;
  }

  /** Row ids currently held (decoding, prefilling or waiting for prefill). */
  rowIds(): number[] {
    return [...this.decoding.rows, ...(this.group?.batch.rows ?? []), ...this.pending].map((r) => r.req.rowId);
  }

  /** KV slots per row the decode batch's buffers hold now. */
  get kvCapacity(): number {
    return this.decoding.kvCapacity;
  }

  get kvBytes(): number {
    return this.decoding.kvBytes + (this.group?.batch.kvBytes ?? 0);
  }

  /** Bytes held by the delta banks of the decode batch and the prefill group. */
  get bankBytes(): number {
    return this.decoding.bankBytes + (this.group?.batch.bankBytes ?? 0);
  }

  /** The size the decode batch feeds a padded axis (default the rank) of a site on a module (0 while no row uses it). */
  fedRank(module: string, site: string, axis = 'rank'): number {
    return this.decoding.axisOf(module, site, axis);
  }

  async step(): Promise<StepResult> {
    const result: StepResult = {
      tokens: [], finished: [], rows: [],
      stats: {
        decodeRows: 0, prefillRows: 0, prefillTokens: 0, decodeMs: 0, prefillMs: 0,
        kvTokens: 0, kvBytes: 0, bankBytes: 0, transfer: { toDevice: 0, toHost: 0 }, runningDeltas: [], failures: [],
      },
    };
    this.applyCancellations(result);
    if (!this.group) await this.formGroup(result);
    const g = this.group;
    if (g) {
      try {
        await this.prefillChunk(g, result);
      } catch (e) {
        // The group's rows fail; those already moved to the decode batch (a failure after the run) go on there.
        const lost = g.batch.rows.filter((r) => !this.decoding.rows.includes(r));
        if (this.group === g) this.group = null;
        g.batch.release();
        this.fail(result, 'prefill', lost, e);
      }
    }
    if (this.decoding.size) {
      try {
        await this.decode(result);
      } catch (e) {
        // Every row of the failed run leaves the decode batch: their KV and bank slices go with them.
        const lost: Row[] = [];
        while (this.decoding.size) lost.push(this.decoding.remove(this.decoding.size - 1));
        this.fail(result, 'decode', lost.reverse(), e);
      }
    }
    result.rows = this.rowIds();
    result.stats.kvTokens = this.decoding.kvTokens;
    result.stats.kvBytes = this.kvBytes;
    result.stats.bankBytes = this.bankBytes;
    result.stats.runningDeltas = [...new Set([...this.decoding.rows, ...(this.group?.batch.rows ?? [])]
      .map((r) => r.req.delta?.id).filter((id): id is string => !!id))];
    return result;
  }

  /**
   * A session run failed: exactly its rows finish with `engine_error` (the
   * server's fault, not the request's); the step's other run, the rows
   * waiting and the next steps go on.
   */
  private fail(result: StepResult, phase: RunFailure['phase'], rows: Row[], err: unknown): void {
    const message = `${phase} run failed: ${(err as Error)?.message ?? String(err)}`;
    result.stats.failures.push({ phase, rows: rows.length, message });
    for (const r of rows) result.finished.push({ rowId: r.req.rowId, reason: 'engine_error', generated: r.generated, error: message });
  }

  private applyCancellations(result: StepResult): void {
    if (!this.cancelled.size) return;
    const done = (r: Row) => result.finished.push({ rowId: r.req.rowId, reason: 'cancelled', generated: r.generated });
    for (let i = this.pending.length - 1; i >= 0; i--) {
      if (this.cancelled.has(this.pending[i].req.rowId)) done(this.pending.splice(i, 1)[0]);
    }
    const g = this.group;
    if (g) {
      for (let i = g.batch.size - 1; i >= 0; i--) {
        if (!this.cancelled.has(g.batch.rows[i].req.rowId)) continue;
        done(g.batch.remove(i));
        moveLastInto(g.pads, i);
      }
      if (g.batch.size === 0) {
        g.batch.release();
        this.group = null;
      }
    }
    for (let i = this.decoding.size - 1; i >= 0; i--) {
      if (this.cancelled.has(this.decoding.rows[i].req.rowId)) done(this.decoding.remove(i));
    }
    this.cancelled.clear();
  }

  private async formGroup(result: StepResult): Promise<void> {
    const room = this.opts.maxBatch - this.decoding.size;
    if (room <= 0 || !this.pending.length) return;
    // Rows of one group are left-padded to its longest prompt: a row joins only while
    // padding stays under half the real tokens, so one long prompt cannot make every
    // short one pay for its length (it gets a group of its own, next).
    // Nor while the longest prefix and the longest prompt together would pass the KV capacity (the
    // context less one): each fits alone (the scheduler's check), not necessarily beside the other.
    let take = 1;
    let longest = this.pending[0].req.promptIds.length;
    let prefix = prefixTokens(this.pending[0]);
    let real = longest;
    while (take < Math.min(room, this.pending.length)) {
      const next = this.pending[take];
      const len = next.req.promptIds.length;
      const nextLongest = Math.max(longest, len);
      const nextPrefix = Math.max(prefix, prefixTokens(next));
      if (nextLongest * (take + 1) > PADDING_LIMIT * (real + len) || nextPrefix + nextLongest > this.opts.maxPositions - 1) break;
      longest = nextLongest;
      prefix = nextPrefix;
      real += len;
      take++;
    }
    const rows = this.pending.splice(0, take);
    try {
      for (const r of rows) if (r.req.delta?.prefix) await this.computePrefix(r.req.delta.prefix, result.stats.transfer);
    } catch (e) {
      // A prefix that could not be computed fails the rows that were to be prefilled with it; it stays not ready.
      this.fail(result, 'prefix', rows, e);
      return;
    }
    const batch = this.newBatch(rows.length);
    for (const r of rows) batch.add(r);
    const prefixSlots = Math.max(...rows.map(prefixTokens));
    batch.reserve(prefixSlots + longest);
    if (prefixSlots > 0) batch.placePrefixes(prefixSlots);
    this.group = { batch, pads: rows.map((r) => longest - r.req.promptIds.length), padded: longest, prefixSlots, done: 0 };
  }

  /**
   * Prompt tuning's prefix: the frozen backbone run once over the virtual
   * tokens' embeddings (ids vocab_size.. read rows of `prompt_embeds`,
   * positions 0.., no delta), as PEFT runs `cat(prompts, inputs_embeds)`:
   * the virtual tokens come first, so their K/V are the same for every
   * prompt. Written into the delta's shared buffers, so later requests that
   * carry the same loaded delta find it ready.
   */
  private async computePrefix(prefix: DeltaPrefix, transfer: Transfer): Promise<void> {
    if (Atomics.load(prefix.ready, 0) === 1 || !prefix.embeds) return;
    if (!this.noPromptEmbeds) throw new Error('this backbone graph has no prompt_embeds input (no embedding Gather of input_ids was found), so prompt-tuned tasks cannot run on it');
    const P = prefix.tokens;
    const bare = new Batch<BatchRow>(this.device, this.io, this.sites, { maxRows: 1, zeroSize: this.opts.zeroSizeTensors ?? true });
    bare.add({ req: { delta: null } });
    // A device that takes no empty past feeds a masked-out slot.
    const pastLen = bare.pastSlots(false);
    const feeds: Record<string, ort.Tensor> = {
      input_ids: i64(Array.from({ length: P }, (_, i) => this.io.vocabSize + i), [1, P]),
      attention_mask: i64([...new Array<number>(pastLen).fill(0), ...new Array<number>(P).fill(1)], [1, pastLen + P]),
      ...(await bare.feeds(false, transfer)),
      [LOGPROBS_ON]: LOGPROBS_NO,
      // slice(): onnxruntime-node refuses a tensor over shared memory.
      [PROMPT_EMBEDS]: new ort.Tensor('float32', prefix.embeds.slice(), [P, prefix.embeds.length / P]),
    };
    if (this.io.hasPositionIds) feeds.position_ids = i64(Array.from({ length: P }, (_, i) => i), [1, P]);
    try {
      const out = await this.device.run(this.session, feeds, this.kvOutputs, transfer);
      const n = this.io.kvHeads * P * this.io.headDim;
      for (let l = 0; l < this.io.layers; l++) {
        prefix.keys.set(await this.device.toHost(out[this.kvOutputs[2 * l]], transfer), l * n);
        prefix.values.set(await this.device.toHost(out[this.kvOutputs[2 * l + 1]], transfer), l * n);
      }
    } finally {
      bare.release();
    }
    Atomics.store(prefix.ready, 0, 1);
  }

  /**
   * Runs the session. When every row is greedy it fetches the in-graph argmax
   * instead of the logits: [batch] ids cross into JavaScript, not [batch, vocab]
   * floats. Logprobs are computed in the graph only when a row of the step asks.
   */
  private async run(feeds: Record<string, ort.Tensor>, rows: Row[], stats: StepResult['stats']) {
    const greedy = rows.every((r) => r.sampler.greedy);
    const logprobs = rows.some((r) => r.req.logprobs !== undefined);
    feeds[LOGPROBS_ON] = logprobs ? LOGPROBS_YES : LOGPROBS_NO;
    if (this.noPromptEmbeds) feeds[PROMPT_EMBEDS] = this.noPromptEmbeds;
    const { layers, vocabSize } = this.io;
    const out = await this.device.run(this.session, feeds, this.fetches[greedy ? 'greedy' : 'logits'][logprobs ? 1 : 0], stats.transfer);
    const data = (name: string) => out[name].data as Float32Array;
    const sampling = rows.flatMap((r, b) => (r.sampler.greedy ? [] : [b]));
    const logits: (HostRows & { vocab: number }) | null = greedy
      ? null
      : { ...(await this.device.hostRows(out.logits, this.device.logitsOnHost ? [] : sampling, vocabSize, stats.transfer)), vocab: vocabSize };
    const argmax = (b: number) => Number((out[GREEDY_TOKEN].data as BigInt64Array)[b]);
    const step = logprobs
      ? { top: data(TOP_LOGPROBS), ids: out[TOP_LOGPROB_IDS].data as BigInt64Array, logsumexp: data(LOGSUMEXP), k: out[TOP_LOGPROBS].dims[1] }
      : null;
    const check = data(LOGITS_NONFINITE);
    return {
      /** Whether row b's logits hold NaN or Inf: it has no meaningful next token. */
      nonFinite: (b: number) => Number.isNaN(check[b]),
      /** Row b's next token: the graph's argmax, or sampled from row b's logits. */
      next: logits
        ? (b: number) => (this.device.logitsOnHost || !rows[b].sampler.greedy ? rows[b].sampler.sample(logits.data, logits.offset(b), vocabSize) : argmax(b))
        : argmax,
      /** Row b's logprobs for the token it picked, when it asked for them. */
      logprobs: (b: number, token: number): TokenLogprobs | undefined => {
        const n = rows[b].req.logprobs;
        const ownLogits = logits && (this.device.logitsOnHost || !rows[b].sampler.greedy) ? logits : null;
        return step && n !== undefined ? tokenLogprobs(step, b, token, n, ownLogits) : undefined;
      },
      keys: Array.from({ length: layers }, (_, l) => out[this.kvOutputs[2 * l]]),
      values: Array.from({ length: layers }, (_, l) => out[this.kvOutputs[2 * l + 1]]),
    };
  }

  private async prefillChunk(g: PrefillGroup, result: StepResult): Promise<void> {
    const rows = g.batch.rows;
    const n = rows.length;
    const start = g.done;
    const chunk = Math.min(g.padded - start, Math.max(1, Math.floor(this.opts.prefillChunkTokens / n)));
    const ids = new Array<number>(n * chunk);
    const pos = new Array<number>(n * chunk);
    const slots = g.prefixSlots;
    for (let b = 0; b < n; b++) {
      const prompt = rows[b].req.promptIds;
      // PEFT: a task's virtual tokens hold positions 0..P-1 and its real tokens follow from P
      // (prefix tuning offsets position_ids by num_virtual_tokens; prompt tuning prepends the embeddings).
      const first = prefixTokens(rows[b]);
      for (let i = 0; i < chunk; i++) {
        const j = start + i - g.pads[b];
        ids[b * chunk + i] = j >= 0 ? prompt[j] : 0;
        pos[b * chunk + i] = first + Math.max(0, j);
      }
    }
    // Past is the group's buffer (full capacity, masked) once a chunk has run or prefixes are in place;
    // packed to the filled slots where capacity + chunk would pass the model's context (GPT-2's causal bias),
    // and for the first chunk after the prefixes (a copy of a few slots beats attending over the whole capacity).
    const hasPast = start > 0 || slots > 0;
    const pack = start === 0 || g.batch.kvCapacity + chunk > this.opts.maxPositions;
    const packed = hasPast && pack ? slots + start : undefined;
    const pastLen = g.batch.pastSlots(hasPast, packed);
    const mask = new Array<number>(n * (pastLen + chunk));
    for (let b = 0; b < n; b++) {
      const row = b * (pastLen + chunk);
      const prefixFrom = slots - prefixTokens(rows[b]);
      for (let j = 0; j < pastLen; j++) {
        // PEFT prepends ones to the attention mask for the virtual tokens: every real token sees them all.
        mask[row + j] = j < slots ? (j >= prefixFrom ? 1 : 0) : j - slots < start && j - slots >= g.pads[b] ? 1 : 0;
      }
      for (let i = 0; i < chunk; i++) mask[row + pastLen + i] = start + i >= g.pads[b] ? 1 : 0;
    }
    const feeds: Record<string, ort.Tensor> = {
      input_ids: i64(ids, [n, chunk]),
      attention_mask: i64(mask, [n, pastLen + chunk]),
      ...(await g.batch.feeds(hasPast, result.stats.transfer, packed)),
    };
    if (this.io.hasPositionIds) feeds.position_ids = i64(pos, [n, chunk]);
    this.sabotage('prefill', feeds);
    const t0 = performance.now();
    const out = await this.run(feeds, rows, result.stats);
    result.stats.prefillMs = performance.now() - t0;
    result.stats.prefillRows = n;
    result.stats.prefillTokens = n * chunk;
    g.batch.append(out.keys, out.values, chunk);
    g.done += chunk;
    if (g.done < g.padded) return;

    // Prompt done: the first token comes from the prefill's logits, then the row joins the decode batch.
    this.group = null;
    for (let b = 0; b < n; b++) {
      const row = rows[b];
      if (out.nonFinite(b)) {
        result.finished.push({ rowId: row.req.rowId, reason: 'non_finite', generated: row.generated });
        continue;
      }
      const token = this.emit(row, out, b, result);
      const promptLen = row.req.promptIds.length;
      const virtual = prefixTokens(row);
      const reason = this.finishReason(row, token, virtual + promptLen + 1);
      if (reason) {
        result.finished.push({ rowId: row.req.rowId, reason, generated: row.generated });
        continue;
      }
      // In the decode batch the prefix and the prompt sit together from slot 0, so a row's
      // next position is its slot count, as PEFT's cache_position counts the virtual tokens.
      const segments = [{ start: g.prefixSlots - virtual, tokens: virtual }, { start: g.prefixSlots + g.pads[b], tokens: promptLen }];
      this.decoding.add(row, { batch: g.batch, index: b, segments: segments.filter((s) => s.tokens > 0) });
    }
    // The rows' K/V are copied out (on a device, by queued runs): then the group's memory goes.
    await this.decoding.settle(result.stats.transfer);
    g.batch.release();
  }

  /** Row b of the step picks its token (with its logprobs, when asked). */
  private emit(row: Row, out: StepOutputs, b: number, result: StepResult): number {
    const token = out.next(b);
    const logprobs = out.logprobs(b, token);
    row.generated++;
    row.lastToken = token;
    result.tokens.push({ rowId: row.req.rowId, token, ...(logprobs ? { logprobs } : {}) });
    return token;
  }

  private finishReason(row: Row, token: number, totalTokens: number): EngineFinish | null {
    if (this.eos.has(token)) return 'eos_token';
    if (row.generated >= row.req.maxNewTokens || totalTokens >= this.opts.maxPositions) return 'length';
    return null;
  }

  private async decode(result: StepResult): Promise<void> {
    const batch = this.decoding;
    const B = batch.size;
    batch.reserveNextToken();
    const C = batch.kvCapacity;
    const len = batch.lengths;
    const transfer: Transfer = result.stats.transfer;
    const feeds: Record<string, ort.Tensor> = {
      ...(await batch.feeds(true, transfer)),
      input_ids: i64(batch.rows.map((r) => r.lastToken), [B, 1]),
      attention_mask: await this.device.decodeMask(len, C, transfer),
    };
    if (this.io.hasPositionIds) feeds.position_ids = i64(len, [B, 1]);
    this.sabotage('decode', feeds);
    const t0 = performance.now();
    const out = await this.run(feeds, batch.rows, result.stats);
    result.stats.decodeMs = performance.now() - t0;
    result.stats.decodeRows = B;
    batch.append(out.keys, out.values);
    const done: number[] = [];
    for (let b = 0; b < B; b++) {
      const row = batch.rows[b];
      // Only this row ends: the others' logits are their own and were checked apart.
      if (out.nonFinite(b)) {
        result.finished.push({ rowId: row.req.rowId, reason: 'non_finite', generated: row.generated });
        done.push(b);
        continue;
      }
      const token = this.emit(row, out, b, result);
      const reason = this.finishReason(row, token, len[b] + 1);
      if (reason) {
        result.finished.push({ rowId: row.req.rowId, reason, generated: row.generated });
        done.push(b);
      }
    }
    for (let i = done.length - 1; i >= 0; i--) batch.remove(done[i]);
  }
}

type StepOutputs = Awaited<ReturnType<Engine['run']>>;

function moveLastInto<T>(arr: T[], i: number): void {
  const last = arr.pop()!;
  if (i < arr.length) arr[i] = last;
}
