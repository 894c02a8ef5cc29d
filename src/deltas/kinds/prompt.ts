/**
 * Prompt tuning and P-tuning: virtual-token embeddings put before the real
 * tokens' embeddings. They come first and attention is causal, so their K/V
 * depend on nothing else: the engine runs the frozen backbone over them once
 * per loaded version (through the `prompt_embeds` input the rewrite adds,
 * src/backbone/rewrite/prompt-embeds.ts) and every row of the task starts
 * with that KV prefix (no graph site).
 *
 * PEFT (`PROMPT_TUNING`, `P_TUNING`) saves `prompt_embeddings`
 * [num_virtual_tokens, token_dim]: for P-tuning, the prompt encoder's
 * (MLP or LSTM) output, which is what PeftModel uses in inference mode.
 * OpenDelta (`soft_prompt`) saves `soft_prompt_layer.soft_embeds`
 * [soft_token_num, hidden], a layer on the backbone's root.
 */
import { z } from 'zod';
import type { Tensor } from '../candidate.js';
import { readSchema, type Problems } from '../problems.js';
import type { DeltaPrefix } from '../types.js';
import { definePrefixKind, type PrefixContext } from './kind.js';
import { checkTokens, kvGeometry, newPrefix, onlyTensor, peftPromptBinding, readPromptLearning, sharedFloats } from './prompt-learning.js';

interface PromptSettings {
  tokens: number;
  /** The embedding width the config declares, when it does. */
  tokenDim: number | null;
  /** The tensor's part name in its format. */
  part: string;
}

const OpenDeltaSchema = z.looseObject({ soft_token_num: z.number().int().positive().default(100) });

function embeddingsPrefix(t: Tensor | null, at: PrefixContext<PromptSettings>): DeltaPrefix | null {
  const { settings: s, backbone, problems } = at;
  const g = kvGeometry(backbone, problems);
  if (!t || !g || !checkTokens(s.tokens, backbone, problems)) return null;
  const H = backbone.hiddenSize;
  let ok = true;
  if (s.tokenDim !== null && s.tokenDim !== H) {
    problems.invalid(`token_dim is ${s.tokenDim} but the backbone '${backbone.name}' embeds tokens in ${H} dimensions`);
    ok = false;
  }
  if (t.shape.length !== 2 || t.shape[0] !== s.tokens || t.shape[1] !== H) {
    problems.invalid(`tensor '${t.name}' is [${t.shape.join(', ')}], expected [${s.tokens}, ${H}] (virtual tokens, the backbone's embedding width)`);
    ok = false;
  }
  if (!ok) return null;
  const embeds = sharedFloats(t.data.length);
  embeds.set(t.data);
  return { ...newPrefix(s.tokens, g, false), embeds };
}

const peftSettings = (config: unknown, problems: Problems): PromptSettings | null => {
  const p = readPromptLearning(config, problems);
  return p && { tokens: p.virtualTokens, tokenDim: p.tokenDim, part: 'prompt_embeddings' };
};

export const promptTuning = definePrefixKind<PromptSettings>({
  type: 'prompt',
  peft: peftPromptBinding('PROMPT_TUNING', peftSettings),
  opendelta: {
    name: 'soft_prompt',
    settings(config, problems) {
      const cfg = readSchema(OpenDeltaSchema, config, 'config.json', problems);
      return cfg && { tokens: cfg.soft_token_num, tokenDim: null, part: 'soft_embeds' };
    },
    key: (name) => (/(^|\.)soft_prompt_layer\.soft_embeds$/.test(name) ? { module: '', part: 'soft_embeds' } : null),
    expected: 'soft_prompt_layer.soft_embeds',
  },
  prefix: (modules, at) => embeddingsPrefix(onlyTensor(modules, at.settings.part, at.problems), at),
});

/** P-tuning differs from prompt tuning in training only: PEFT saves the prompt encoder's output. */
export const pTuning = definePrefixKind<PromptSettings>({
  type: 'prompt',
  peft: peftPromptBinding('P_TUNING', peftSettings),
  prefix: (modules, at) => embeddingsPrefix(onlyTensor(modules, at.settings.part, at.problems), at),
});
