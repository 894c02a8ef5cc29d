/**
 * A delta after parsing and validation, in the layout the engine's banks want:
 * every factor already transposed to `x · A · B` order with its scale folded in.
 */
export type DeltaType = 'lora' | 'adapter' | 'bitfit';
export type DeltaFormat = 'peft' | 'opendelta';
export type Activation = 'relu' | 'gelu' | 'gelu_new' | 'silu';

export interface LoraSite {
  kind: 'lora';
  module: string;
  rank: number;
  /** [in, rank], row-major. */
  a: Float32Array;
  /** [rank, out], row-major, already multiplied by the scale (alpha / r, or alpha / sqrt(r)). */
  b: Float32Array;
}

/** Bottleneck adapter on a module's output: h + up(act(h · down + downBias)) + upBias. */
export interface AdapterSite {
  kind: 'adapter';
  module: string;
  bottleneck: number;
  /** [out, bottleneck] */
  down: Float32Array;
  /** [bottleneck] */
  downBias: Float32Array;
  /** [bottleneck, out] */
  up: Float32Array;
  /** [out] */
  upBias: Float32Array;
}

/** BitFit: h + bias on a module's output; `bias` is the difference from the backbone's own bias. */
export interface BiasSite {
  kind: 'bitfit';
  module: string;
  /** [out] */
  bias: Float32Array;
}

export type DeltaSite = LoraSite | AdapterSite | BiasSite;

export interface LoadedDelta {
  id: string;
  /** sha256 of the stored manifest: changes when the delta is replaced. */
  version: string;
  type: DeltaType;
  format: DeltaFormat;
  /** Largest rank (LoRA) or bottleneck (adapter); 0 for BitFit. */
  rank: number;
  activation: Activation | null;
  sites: DeltaSite[];
  /** Bytes of parameter data held in memory. */
  bytes: number;
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
  sites: { module: string; kind: DeltaType; shapes: number[][] }[];
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
  /** Looks in the store on disk before answering null, so replicas see each other's registrations. */
  get(id: string): Promise<DeltaRecord | null>;
  remove(id: string): Promise<void>;
  isCached(id: string): boolean;
}
