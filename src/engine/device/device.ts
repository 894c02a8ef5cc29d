/**
 * Where the engine's per-row memory lives, behind one interface: the KV cache
 * and the delta banks' feeds, the decode step's attention mask, and every
 * session run (which is where bytes cross between host and device, so it is
 * where they are counted). `cpu.ts` keeps today's typed arrays, fed to ORT in
 * place; `webgpu.ts` keeps device tensors that never come back to the host.
 * A future CUDA binding with device tensors would be a third implementation.
 */
import type * as ort from 'onnxruntime-node';
import type { KvSegment, KvShape } from '../kv-pool.js';

/** Bytes that crossed between host and device, by direction. */
export interface Transfer {
  toDevice: number;
  toHost: number;
}

/** Another batch's row as the source of a joining row's K/V: row `row`'s slots, segment after segment (its KV prefix, its prompt). */
export interface KvRowSource {
  store: KvStore;
  row: number;
  segments: readonly KvSegment[];
}

/** A task's KV prefix, per layer [kvHeads, tokens, D] keys then values, layer after layer (DeltaPrefix's layout). */
export interface KvPrefix {
  tokens: number;
  keys: Float32Array;
  values: Float32Array;
}

/**
 * One batch's KV cache, per layer [rows, kvHeads, capacity, headDim] for keys
 * and values. Row b holds its tokens in slots 0..len[b]-1. Every change is
 * made at once in the bookkeeping (len, capacity); a device may finish the
 * data moves later, and `settle` waits for them.
 */
export interface KvStore {
  readonly len: readonly number[];
  readonly capacity: number;
  readonly rows: number;
  readonly tokensHeld: number;
  readonly bytesAllocated: number;
  /** Room for `rows` rows of `tokens` slots. */
  ensure(rows: number, tokens: number): void;
  /** Once per decode step, before `ensure`: a host pool spreads capacity growth over steps. */
  growAhead(): void;
  addRow(from: KvRowSource): void;
  addEmptyRow(): void;
  /**
   * Puts row b's prefix (null: none) in its first `slots` slots, right-aligned, and counts
   * `slots` more slots held by every row. On a fresh store after `ensure`, before any run.
   */
  placePrefixes(prefixes: readonly (KvPrefix | null)[], slots: number): void;
  /** Removes row `i`: the last row takes its place. */
  removeRow(i: number): void;
  /** Writes a run's new K/V ([rows, kvHeads, steps, D] per layer, as the session returned them) after each row's slots. */
  append(keys: ort.Tensor[], values: ort.Tensor[], steps: number): void;
  /**
   * The past feeds of a run over every row (capacity slots), once settled; without `past`, a first prefill
   * chunk's past, empty or masked out. `packed`: only each row's first `packed` slots (a copy).
   */
  pastFeeds(past: boolean, transfer: Transfer, packed?: number): Promise<Record<string, ort.Tensor>>;
  /** Past slots `pastFeeds` feeds (the attention mask's past columns): a first chunk's is 0, or 1 where zero-size tensors crash. */
  pastSlots(past: boolean, packed?: number): number;
  /** Waits for data moves still under way, adding the bytes they moved across to `transfer`. */
  settle(transfer?: Transfer): Promise<void>;
  /** Frees what the store holds (the batch is done with it). */
  release(): void;
}

/** A delta-bank feed and what identifies its contents (equal stamps: equal data). */
export interface StampedFeed {
  tensor: ort.Tensor;
  stamp: string;
}

/** One batch's delta-bank feeds in the form the session takes. */
export interface BankFeeder {
  /** Host tensors as they are, or device copies uploaded only when a feed's stamp changes. */
  feeds(feeds: Record<string, StampedFeed>, transfer: Transfer): Promise<Record<string, ort.Tensor>>;
  release(): void;
}

/** Rows of a [batch, vocab] logits output on the host: row b starts at offset(b). */
export interface HostRows {
  data: Float32Array;
  offset(b: number): number;
}

export interface Device {
  readonly name: 'cpu' | 'cuda' | 'webgpu';
  /**
   * Whether a step's logits output is on the host whole. When not, a step
   * that samples fetches only the sampling rows' logits (hostRows) and greedy
   * rows read the in-graph argmax.
   */
  readonly logitsOnHost: boolean;
  /** A KV store for one batch; `maxTokens` caps its capacity (slots per row). */
  kv(shape: KvShape, maxRows: number, maxTokens?: number): KvStore;
  banks(): BankFeeder;
  /** A decode step's attention mask [rows, capacity + 1]: row b sees its `lengths[b]` slots and the new token. */
  decodeMask(lengths: readonly number[], capacity: number, transfer: Transfer): Promise<ort.Tensor>;
  /** Runs the session, counting what crosses into `transfer`. */
  run(session: ort.InferenceSession, feeds: Record<string, ort.Tensor>, fetches: string[], transfer: Transfer): Promise<ort.InferenceSession.OnnxValueMapType>;
  /** A float output of a run (as `run` returned it), whole on the host. */
  toHost(t: ort.Tensor, transfer: Transfer): Promise<Float32Array>;
  /** Rows `rows` of a [batch, vocab] logits output, on the host (the rows that sample). */
  hostRows(logits: ort.Tensor, rows: number[], vocab: number, transfer: Transfer): Promise<HostRows>;
}

const ELEMENT_BYTES: Record<string, number> = { float32: 4, int64: 8, bool: 1, float16: 2, int32: 4, uint8: 1, int8: 1 };

/** A tensor's bytes, from its type and dims (reading `.data` of a device tensor would abort the process). */
export function tensorBytes(t: ort.Tensor): number {
  const per = ELEMENT_BYTES[t.type];
  if (per === undefined) throw new Error(`no byte size known for tensor type ${t.type}`);
  return t.size * per;
}
