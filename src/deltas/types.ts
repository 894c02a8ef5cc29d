/**
 * A delta after parsing and validation, in the layout the engine's banks
 * want: each module's parameters laid out as one row of its graph site's
 * banks (factors transposed to `x · A · B` order, scales folded in,
 * low-rank adapters' rank-1 factors and compacters' PHM factors laid out for
 * their sites, or a compacter multiplied out). What produced them is its kind's
 * business (src/deltas/kinds); everything after validation is kind-agnostic.
 */
import type { Axes } from '../backbone/rewrite/delta-sites.js';

/** A kind's `type`: lora, adapter, bitfit, ia3, compacter, low_rank_adapter, parallel_adapter, prefix, prompt. */
export type DeltaType = string;
export type DeltaFormat = 'peft' | 'opendelta';

export interface DeltaSite {
  module: string;
  /** The graph site that applies it: lora, adapter, bias, ia3, compacter, low_rank_adapter. */
  site: string;
  /** Sizes of the site's padded axes in its slices (a LoRA's `rank`; a compacter's `phm_rank` and `block`; a low-rank adapter's `bottleneck`); none for fixed-size sites. */
  axes: Axes;
  /** One row's slice of each bank it writes, by bank key. */
  data: Record<string, Float32Array>;
}

/**
 * What a prompt-learning delta (prefix tuning, prompt tuning, P-tuning) is to
 * the engine: `tokens` virtual tokens at the start of every row of its task,
 * as per-layer K/V in the row's first KV slots. Prefix tuning saves the K/V
 * themselves; prompt tuning and P-tuning save embeddings, which the engine
 * runs through the frozen backbone once (their K/V depend on nothing else,
 * since they come first and attention is causal) and writes into `keys` and
 * `values`. Every array sits in shared memory, so the engine thread's one
 * computation serves every later request that carries the same loaded delta.
 */
export interface DeltaPrefix {
  tokens: number;
  /** [layers, kvHeads, tokens, headDim]: filled at load (prefix tuning) or by the engine (from `embeds`). */
  keys: Float32Array;
  values: Float32Array;
  /** [tokens, hidden] virtual-token embeddings (prompt tuning, P-tuning); absent for prefix tuning. */
  embeds?: Float32Array;
  /** One Int32: 1 once `keys` and `values` hold the prefix. */
  ready: Int32Array;
}

export interface LoadedDelta {
  id: string;
  /** sha256 of the stored manifest: changes when the delta is replaced. */
  version: string;
  type: DeltaType;
  format: DeltaFormat;
  /** Largest rank (LoRA) or bottleneck (adapters); 0 for BitFit and IA³. */
  rank: number;
  sites: DeltaSite[];
  /** Prompt-learning kinds: the KV prefix each row of the task starts with (such a delta has no sites). */
  prefix?: DeltaPrefix;
  /** Bytes of parameter data held in memory (a prefix's K/V included). */
  bytes: number;
}

/** One site as the store and the admin API describe it: no parameter data. */
export interface SiteSummary {
  module: string;
  /** The delta's kind. */
  kind: DeltaType;
  /** The graph site serving it (a compacter is served through the adapter site). */
  site: string;
  /** Shapes of its parameters as served, in the site's bank order. */
  shapes: number[][];
}

/** A delta as the store and the admin API describe it (no parameter data). */
export interface DeltaRecord {
  id: string;
  type: DeltaType;
  format: DeltaFormat;
  rank: number;
  bytes: number;
  /** sha256 of the manifest, which lists the sha256 of every stored file. */
  sha256: string;
  createdAt: string;
  sites: SiteSummary[];
  /** Held in the delta cache whatever the traffic (never evicted). */
  pinned: boolean;
}

/** One page of the registered deltas, ordered by id. */
export interface DeltaPage {
  records: DeltaRecord[];
  /** Whether ids after the last one on this page exist. */
  hasMore: boolean;
}

/** One uploaded or imported file: its own name and where it sits on disk now. */
export interface DeltaFile {
  name: string;
  path: string;
}

/** The delta admin surface the HTTP layer uses. Errors are thrown as ServeError. */
export interface DeltaRegistry {
  register(id: string, files: DeltaFile[], opts: { replace: boolean }): Promise<DeltaRecord>;
  list(): Promise<DeltaRecord[]>;
  /** Up to `limit` deltas with ids after `after` (exclusive), from the in-memory index: no manifest is read. */
  page(opts: { limit: number; after?: string }): Promise<DeltaPage>;
  /** How many deltas are registered, without touching the disk on the caller's path. */
  count(): number;
  /** Pins (or unpins) a delta in the cache; persisted in its manifest. 404 unknown, 409 past the cache budget. */
  setPinned(id: string, pinned: boolean): Promise<DeltaRecord>;
  /** Looks in the store on disk before answering null, so replicas see each other's registrations. */
  get(id: string): Promise<DeltaRecord | null>;
  remove(id: string): Promise<void>;
  isCached(id: string): boolean;
}
