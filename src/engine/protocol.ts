/** What crosses between the scheduler (main thread) and the engine (worker thread). */
import type { DecoderIO } from '../backbone/decoder-io.js';
import type { SiteLayout } from '../backbone/rewrite/delta-sites.js';
import type { ExecutionProvider } from '../backbone/session.js';
import type { LoadedDelta } from '../deltas/types.js';
import type { TokenLogprobs } from './logprobs.js';
import type { SamplerParams } from './sampler.js';

export interface RowRequest {
  rowId: number;
  promptIds: number[];
  sampling: SamplerParams;
  maxNewTokens: number;
  delta: LoadedDelta | null;
  /** Set: each token comes with its logprob and this many alternatives (0–5). */
  logprobs?: number;
}

/**
 * `non_finite`: the row's logits held NaN or Inf (its delta overflows), so it has no next token.
 * `engine_error`: the session run this row was in failed; the row is gone from the engine (its KV and bank slices freed).
 */
export type EngineFinish = 'eos_token' | 'length' | 'cancelled' | 'non_finite' | 'engine_error';

/** The engine's two kinds of session run in a step. */
export type RunPhase = 'prefill' | 'decode';

/** A session run that failed (or a prompt-learning prefix computed before a prefill), and how many rows it took with it. */
export interface RunFailure {
  phase: 'prefix' | RunPhase;
  rows: number;
  message: string;
}

export interface StepStats {
  /** Rows decoded this step. */
  decodeRows: number;
  /** Rows in the prefill chunk run this step (0 if none). */
  prefillRows: number;
  prefillTokens: number;
  decodeMs: number;
  prefillMs: number;
  kvTokens: number;
  kvBytes: number;
  /** Bytes the delta banks hold (decode batch and prefill group). */
  bankBytes: number;
  /** Bytes that crossed between host and device this step (none on the CPU provider: ORT reads host arrays in place). */
  transfer: { toDevice: number; toHost: number };
  /** Delta ids (task ids) of the rows now running. */
  runningDeltas: string[];
  /** Runs of this step that failed (their rows finished with `engine_error`); the step's other runs went on. */
  failures: RunFailure[];
}

export interface StepResult {
  tokens: { rowId: number; token: number; logprobs?: TokenLogprobs }[];
  /** `error`: what failed, with reason `engine_error`. */
  finished: { rowId: number; reason: EngineFinish; generated: number; error?: string }[];
  /** Row ids in the engine after this step (decoding or prefilling). */
  rows: number[];
  stats: StepStats;
}

/** The engine graph the main thread built, and what the engine needs to run it. */
export interface EngineInit {
  /** The rewritten model's bytes, or its path when its weights sit in external data files. */
  model: Uint8Array | string;
  io: DecoderIO;
  sites: SiteLayout[];
  eosTokenIds: number[];
  maxPositions: number;
  ep: ExecutionProvider;
  threads?: number;
  maxBatch: number;
  prefillChunkTokens: number;
}

export type ToEngine =
  | { type: 'init'; init: EngineInit }
  | { type: 'add'; row: RowRequest }
  | { type: 'cancel'; rowId: number }
  /** Test-only (DELTASERVE_FAULTS=engine-step): the next `runs` session runs (of `phase`, or any) are fed a wrong-typed input, so they fail. */
  | { type: 'fault'; runs: number; phase: RunPhase | 'any' };

export type FromEngine =
  | { type: 'ready' }
  | { type: 'step'; result: StepResult }
  /** A step failed: its rows are cancelled; `rowIds` names them (none when the engine could not start). */
  | { type: 'error'; message: string; rowIds: number[] };
