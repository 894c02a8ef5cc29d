/**
 * What PEFT's prompt-learning methods (PREFIX_TUNING, PROMPT_TUNING,
 * P_TUNING) share, for the kinds in prefix.ts and prompt.ts: their config
 * fields (PEFT's PromptLearningConfig) and the shared-memory K/V a prefix is
 * kept in. Not a kind itself.
 */
import { z } from 'zod';
import type { BackboneInfo } from '../../backbone/types.js';
import type { Tensor } from '../candidate.js';
import { readSchema, type Problems } from '../problems.js';
import type { DeltaPrefix } from '../types.js';
import type { FormatBinding } from './kind.js';

const PromptLearningSchema = z.looseObject({
  num_virtual_tokens: z.number().int().positive(),
  token_dim: z.number().int().positive().nullish(),
  num_layers: z.number().int().positive().nullish(),
  num_attention_heads: z.number().int().positive().nullish(),
  num_transformer_submodules: z.number().int().positive().nullish(),
});

export interface PromptLearningSettings {
  virtualTokens: number;
  tokenDim: number | null;
  numLayers: number | null;
  numAttentionHeads: number | null;
}

/** PEFT's prompt-learning fields; a causal LM has one transformer submodule (two is an encoder-decoder's). */
export function readPromptLearning(config: unknown, problems: Problems): PromptLearningSettings | null {
  const cfg = readSchema(PromptLearningSchema, config, 'adapter_config.json', problems);
  if (!cfg) return null;
  if ((cfg.num_transformer_submodules ?? 1) !== 1) {
    problems.unsupported(
      `num_transformer_submodules is ${cfg.num_transformer_submodules}: the prompt was trained for an encoder-decoder model; deltaserve serves decoder-only (CAUSAL_LM) prompts`,
    );
    return null;
  }
  return {
    virtualTokens: cfg.num_virtual_tokens,
    tokenDim: cfg.token_dim ?? null,
    numLayers: cfg.num_layers ?? null,
    numAttentionHeads: cfg.num_attention_heads ?? null,
  };
}

/** PEFT saves a prompt-learning delta's one tensor as `prompt_embeddings` (get_peft_model_state_dict). */
export function peftPromptBinding<S>(name: string, settings: FormatBinding<S>['settings']): FormatBinding<S> {
  return {
    name,
    settings,
    key: (key) => (key === 'prompt_embeddings' ? { module: '', part: 'prompt_embeddings' } : null),
    expected: 'prompt_embeddings',
  };
}

/** A Float32Array in shared memory, so the engine thread reads (and fills) the very bytes the cache holds. */
export function sharedFloats(n: number): Float32Array {
  return new Float32Array(new SharedArrayBuffer(n * 4));
}

/** The backbone's K/V geometry, or null with a problem when it is unknown (a prefix cannot be checked then). */
export function kvGeometry(backbone: BackboneInfo, problems: Problems): { layers: number; kvHeads: number; headDim: number } | null {
  if (!backbone.kvHeads || !backbone.headDim) {
    problems.unsupported(`the backbone '${backbone.name}' does not say its K/V heads and head size, so a KV prefix cannot be checked against it`);
    return null;
  }
  return { layers: backbone.numLayers, kvHeads: backbone.kvHeads, headDim: backbone.headDim };
}

/** An empty prefix of `tokens` virtual tokens for this geometry; `ready` once its K/V are written. */
export function newPrefix(tokens: number, g: { layers: number; kvHeads: number; headDim: number }, ready: boolean): DeltaPrefix {
  const n = g.layers * g.kvHeads * tokens * g.headDim;
  const flag = new Int32Array(new SharedArrayBuffer(4));
  flag[0] = ready ? 1 : 0;
  return { tokens, keys: sharedFloats(n), values: sharedFloats(n), ready: flag };
}

/** The one tensor of a prompt-learning delta, or null with a problem for each missing or extra one. */
export function onlyTensor(modules: ReadonlyMap<string, ReadonlyMap<string, Tensor>>, part: string, problems: Problems): Tensor | null {
  const t = modules.get('')?.get(part);
  if (!t) problems.invalid(`the weights have no '${part}' tensor`);
  return t ?? null;
}

/** Virtual tokens must leave room for at least one real token and one generated one. */
export function checkTokens(tokens: number, backbone: BackboneInfo, problems: Problems): boolean {
  if (tokens + 2 <= backbone.maxPositions) return true;
  problems.invalid(`${tokens} virtual tokens leave no room in the backbone's context of ${backbone.maxPositions} positions`);
  return false;
}
