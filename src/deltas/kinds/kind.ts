/**
 * What a kind of delta is to the server. Each kind (LoRA, bottleneck adapter,
 * BitFit, IA³, …) lives in one file of this folder and is the one place that
 * knows it: the names PEFT or OpenDelta give it and its tensors, its own
 * config fields, how one module's tensors are checked (every problem listed)
 * and laid out for the engine's banks, and the graph site that applies it.
 * Formats, validation, banks, the rewrite and the API iterate over kinds
 * (index.ts registers them); none of them branches on one.
 */
import type { Axes, GraphSite } from '../../backbone/rewrite/delta-sites.js';
import type { BackboneInfo, LinearModule } from '../../backbone/types.js';
import type { Tensor } from '../candidate.js';
import type { Problems } from '../problems.js';
import type { DeltaPrefix } from '../types.js';

/** A tensor key split into the module it belongs to and which of the kind's parameters it is. */
export type KeyMatch = { module: string; part: string } | { refused: string } | null;

/** How one format (PEFT, OpenDelta) writes a kind. `S` is the kind's settings, whatever the format. */
export interface FormatBinding<S> {
  /** The config's name for it: PEFT's `peft_type`, OpenDelta's `delta_type`. */
  name: string;
  /** Reads the kind's own config fields (the format reads the shared ones); null after reporting problems. */
  settings(config: unknown, problems: Problems): S | null;
  /** Splits a tensor key (PEFT's `base_model.model.` already removed): null when the key is not one of the kind's. */
  key(name: string): KeyMatch;
  /** What its keys look like, for the message about a key that is not one. */
  expected: string;
  /** A target naming an enclosing module covers every linear inside it (OpenDelta's BitFit). */
  broadcastTargets?: boolean;
}

/** One module's parameters, laid out as one row of its graph site's banks. */
export interface SiteRows {
  /** The rank the delta reports and the server's maximum rank bounds (a LoRA's r, an adapter's bottleneck); 0 for none. */
  rank: number;
  /** Sizes of the site's padded axes in these slices; `{ rank }` when absent (a site whose one padded axis is the rank). */
  axes?: Axes;
  /** The site serving this module when it is not the kind's own `site` (one of the kind's `otherSites`). */
  site?: GraphSite;
  /** A row's slice per bank key, in the bank's layout ([in, rank], [1, out], …), scales folded in. */
  data: Record<string, Float32Array>;
}

export interface BuildContext<S> {
  module: LinearModule;
  /** The module's name as the delta's files write it, for messages. */
  name: string;
  settings: S;
  backbone: BackboneInfo;
  problems: Problems;
}

export interface DeltaKind<S = unknown> {
  /** The delta's `type` in the API and the store. */
  readonly type: string;
  /** The graph site that applies it. */
  readonly site: GraphSite;
  /** Sites `build` may place a module on instead (SiteRows.site), e.g. where the kind's own site cannot serve it. */
  readonly otherSites?: readonly GraphSite[];
  readonly peft?: FormatBinding<S>;
  readonly opendelta?: FormatBinding<S>;
  /**
   * Checks one module's tensors against the module and lays them out for the
   * banks; reports every problem and returns null when they do not fit.
   * Tensor values are checked for NaN and Inf elsewhere.
   */
  build(parts: ReadonlyMap<string, Tensor>, at: BuildContext<S>): SiteRows | null;
}

/** Registers a kind with its settings type checked, and erased for the list every other module iterates. */
export const defineKind = <S>(kind: DeltaKind<S>): DeltaKind => kind as DeltaKind;

export interface PrefixContext<S> {
  settings: S;
  backbone: BackboneInfo;
  problems: Problems;
}

/**
 * A prompt-learning kind (prefix tuning, prompt tuning, P-tuning; OpenDelta's
 * prefix and soft prompt). It has no graph site: every row of its task starts
 * with a KV prefix (src/deltas/types.ts, DeltaPrefix), placed by the engine's
 * batch at admission.
 */
export interface PrefixKind<S = unknown> {
  readonly type: string;
  readonly peft?: FormatBinding<S>;
  readonly opendelta?: FormatBinding<S>;
  /**
   * Checks the delta's tensors (by module as the files name them; '' for
   * tensors of no module) against the backbone and lays out its prefix;
   * reports every problem and returns null when they do not fit.
   */
  prefix(modules: ReadonlyMap<string, ReadonlyMap<string, Tensor>>, at: PrefixContext<S>): DeltaPrefix | null;
}

export type AnyKind = DeltaKind | PrefixKind;

export const definePrefixKind = <S>(kind: PrefixKind<S>): PrefixKind => kind as PrefixKind;

export const isPrefixKind = (kind: AnyKind): kind is PrefixKind => 'prefix' in kind;

const fmt = (shape: readonly number[]) => `[${shape.join(', ')}]`;

/** Whether `t` has shape `want`; reports the module, the tensor and both shapes when not. */
export function expectShape(at: BuildContext<unknown>, what: string, t: Tensor, want: number[]): boolean {
  if (t.shape.length === want.length && t.shape.every((d, i) => d === want[i])) return true;
  const m = at.module;
  at.problems.invalid(`module '${m.name}' (in ${m.inFeatures}, out ${m.outFeatures}): ${what} '${t.name}' is ${fmt(t.shape)}, expected ${fmt(want)}`);
  return false;
}

/** Each named part, or null with a problem for each that is missing. */
export function needParts(parts: ReadonlyMap<string, Tensor>, names: string[], at: BuildContext<unknown>): Tensor[] | null {
  const missing = names.filter((n) => !parts.has(n));
  for (const n of missing) at.problems.invalid(`module '${at.name}' has no ${n} tensor`);
  return missing.length ? null : names.map((n) => parts.get(n)!);
}

/** [rows, cols] row-major → [cols, rows] row-major, times a scale, into a fresh array. */
export function transposed(src: Float32Array, rows: number, cols: number, scale = 1): Float32Array {
  const out = new Float32Array(rows * cols);
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) out[j * rows + i] = src[i * cols + j] * scale;
  }
  return out;
}
