/**
 * What a format parser hands to validation: the delta's parameters in the
 * layout its files use, under the module names its files use. Validation
 * resolves the names against the backbone and builds the LoadedDelta.
 */
import type { Activation, DeltaFormat, DeltaType } from './types.js';

export interface Tensor {
  /** The tensor's key in its file, for messages. */
  name: string;
  shape: number[];
  data: Float32Array;
}

export type CandidateSite =
  | {
      kind: 'lora';
      module: string;
      /** [r, in], as PEFT and OpenDelta store lora_A. */
      a: Tensor;
      /** [out, r], as PEFT and OpenDelta store lora_B. */
      b: Tensor;
      /** The rank the config declares for this module (the factors must agree). */
      rank: number;
      scale: number;
    }
  | {
      kind: 'adapter';
      module: string;
      /** nn.Linear(dim, bottleneck).weight: [bottleneck, dim] */
      downWeight: Tensor;
      downBias: Tensor;
      /** nn.Linear(bottleneck, dim).weight: [dim, bottleneck] */
      upWeight: Tensor;
      upBias: Tensor;
      bottleneck: number;
    }
  | {
      kind: 'bitfit';
      module: string;
      /** The tuned bias itself, [out]. */
      bias: Tensor;
    };

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
  type: DeltaType;
  format: DeltaFormat;
  activation: Activation | null;
  sites: CandidateSite[];
  targets: Targets;
}
