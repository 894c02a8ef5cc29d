/**
 * What a format parser hands to validation: the delta's kind and settings,
 * and its tensors grouped by module under the names its files use.
 * Validation resolves the names against the backbone and has the kind build
 * each module's bank rows.
 */
import type { AnyKind } from './kinds/kind.js';
import type { DeltaFormat } from './types.js';

export interface Tensor {
  /** The tensor's key in its file, for messages. */
  name: string;
  shape: number[];
  data: Float32Array;
}

/** One entry of target_modules / modified_modules, so validation can name entries that match nothing. */
export interface TargetEntry {
  label: string;
  matches(modulePath: string): boolean;
}

export interface Targets {
  /** The config field the entries come from, for messages (`target_modules`). */
  field: string;
  entries: TargetEntry[];
  /** Whether the config puts a delta on this backbone module (entries, exclusions and layer filters together). */
  covers(modulePath: string): boolean;
}

export interface CandidateDelta {
  kind: AnyKind;
  format: DeltaFormat;
  /** The kind's settings, as its format binding read them. */
  settings: unknown;
  /** Module name as the files write it → the kind's part name → tensor. */
  modules: Map<string, Map<string, Tensor>>;
  /** Which modules the config selects (none for a prompt-learning kind, which has no graph site). */
  targets: Targets;
}
