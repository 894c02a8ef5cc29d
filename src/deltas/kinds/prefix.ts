/**
 * Prefix tuning: per virtual token, each layer's key and value, served as the
 * first KV slots of every row of the task (no graph site).
 *
 * PEFT (`PREFIX_TUNING`) saves `prompt_embeddings` [num_virtual_tokens,
 * num_layers·2·token_dim], already through the prefix projection when there
 * was one (get_prompt_embedding_to_save). `PeftModel.get_prompt` views a row
 * as [num_layers·2, num_attention_heads, token_dim / num_attention_heads] and
 * splits it in pairs: layer l's key is entry 2l, its value 2l+1. For a
 * grouped-query model PEFT sets token_dim = head_dim·num_key_value_heads and
 * num_attention_heads = num_key_value_heads (_prepare_prompt_learning_config,
 * PEFT #1901), so the prefix has the K/V width, not the hidden width.
 *
 * OpenDelta (`prefix`) puts a PrefixLayer on each attention module (GPT-2's
 * `attn`) holding `<attn>.prefix.past_key` and `.past_value` [prefix_token_num,
 * hidden], viewed as [tokens, heads, head_dim]. With reparameterize (its
 * default) the prefix is an MLP's output that OpenDelta does not save, so
 * only reparameterize=false deltas are served.
 */
import { z } from 'zod';
import type { BackboneInfo } from '../../backbone/types.js';
import type { Tensor } from '../candidate.js';
import { readSchema, type Problems } from '../problems.js';
import type { DeltaPrefix } from '../types.js';
import { definePrefixKind } from './kind.js';
import { checkTokens, kvGeometry, newPrefix, onlyTensor, peftPromptBinding, readPromptLearning, type PromptLearningSettings } from './prompt-learning.js';

type PrefixSettings = { format: 'peft'; peft: PromptLearningSettings } | { format: 'opendelta'; tokens: number };

const OpenDeltaSchema = z.looseObject({
  prefix_token_num: z.number().int().positive().default(6),
  reparameterize: z.boolean().default(true),
});

/** A decoder layer's index from a module path (`transformer.h.3.attn` → 3). */
const layerOf = (path: string) => {
  const m = /(?:^|\.)(?:h|layers|layer|block|blocks)\.(\d+)(?:\.|$)/.exec(path);
  return m ? Number(m[1]) : null;
};

function fromPeft(t: Tensor, s: PromptLearningSettings, backbone: BackboneInfo, problems: Problems): DeltaPrefix | null {
  const g = kvGeometry(backbone, problems);
  if (!g || !checkTokens(s.virtualTokens, backbone, problems)) return null;
  const width = g.kvHeads * g.headDim;
  let ok = true;
  if (s.numLayers !== null && s.numLayers !== g.layers) {
    problems.invalid(`num_layers is ${s.numLayers} but the backbone '${backbone.name}' has ${g.layers} layers`);
    ok = false;
  }
  if ((s.tokenDim !== null && s.tokenDim !== width) || (s.numAttentionHeads !== null && s.numAttentionHeads !== g.kvHeads)) {
    const gqa = backbone.hiddenSize !== width && s.tokenDim === backbone.hiddenSize
      ? ` (this backbone has grouped-query attention: a prefix saved by a PEFT without grouped-query support (before PEFT #1901) has the query heads' width; retrain it with a current PEFT)`
      : '';
    problems.invalid(
      `token_dim ${s.tokenDim} and num_attention_heads ${s.numAttentionHeads} do not match the backbone's K/V: ${g.kvHeads} heads × ${g.headDim} = ${width}${gqa}`,
    );
    ok = false;
  }
  const rowWidth = g.layers * 2 * width;
  if (t.shape.length !== 2 || t.shape[0] !== s.virtualTokens || t.shape[1] !== rowWidth) {
    problems.invalid(
      `tensor '${t.name}' is [${t.shape.join(', ')}], expected [${s.virtualTokens}, ${rowWidth}] (num_virtual_tokens, num_layers·2·${width})`,
    );
    ok = false;
  }
  if (!ok) return null;
  const P = s.virtualTokens;
  const { kvHeads: KV, headDim: D } = g;
  const prefix = newPrefix(P, g, true);
  // Row t is [layer·2 + (0 key | 1 value), head, d]; the engine wants [layer, head, t, d].
  for (let t0 = 0; t0 < P; t0++) {
    for (let l = 0; l < g.layers; l++) {
      for (const [which, dst] of [[0, prefix.keys], [1, prefix.values]] as const) {
        for (let h = 0; h < KV; h++) {
          const src = t0 * rowWidth + ((2 * l + which) * KV + h) * D;
          dst.set(t.data.subarray(src, src + D), ((l * KV + h) * P + t0) * D);
        }
      }
    }
  }
  return prefix;
}

function fromOpenDelta(
  modules: ReadonlyMap<string, ReadonlyMap<string, Tensor>>, tokens: number, backbone: BackboneInfo, problems: Problems,
): DeltaPrefix | null {
  const g = kvGeometry(backbone, problems);
  if (!g || !checkTokens(tokens, backbone, problems)) return null;
  const width = g.kvHeads * g.headDim;
  const byLayer = new Map<number, ReadonlyMap<string, Tensor>>();
  let ok = true;
  for (const [module, parts] of modules) {
    const l = layerOf(module);
    if (l === null || l >= g.layers) {
      problems.invalid(`module '${module}' has a prefix but is not in one of the backbone's ${g.layers} layers`);
      ok = false;
      continue;
    }
    if (byLayer.has(l)) {
      problems.invalid(`layer ${l} has two prefixes (on '${module}' and another module)`);
      ok = false;
      continue;
    }
    byLayer.set(l, parts);
    for (const part of ['past_key', 'past_value']) {
      const t = parts.get(part);
      if (!t) {
        problems.invalid(`module '${module}' has no prefix.${part} tensor`);
        ok = false;
      } else if (t.shape.length !== 2 || t.shape[0] !== tokens || t.shape[1] !== width) {
        problems.invalid(`tensor '${t.name}' is [${t.shape.join(', ')}], expected [${tokens}, ${width}] (prefix_token_num, the layer's K/V width)`);
        ok = false;
      }
    }
  }
  const missing = Array.from({ length: g.layers }, (_, l) => l).filter((l) => !byLayer.has(l));
  if (ok && missing.length) {
    // Layers without a prefix would hold fewer K/V than the rest; one slot layout serves every layer.
    problems.unsupported(`layers ${missing.join(', ')} have no prefix; deltaserve serves a prefix on every layer (modified_modules covering each attention module)`);
    ok = false;
  }
  if (!ok) return null;
  const prefix = newPrefix(tokens, g, true);
  const { kvHeads: KV, headDim: D } = g;
  for (const [l, parts] of byLayer) {
    // OpenDelta's expand_batchsize: [tokens, heads·D] → [heads, tokens, D].
    for (const [part, dst] of [['past_key', prefix.keys], ['past_value', prefix.values]] as const) {
      const src = parts.get(part)!.data;
      for (let h = 0; h < KV; h++) {
        for (let t0 = 0; t0 < tokens; t0++) dst.set(src.subarray(t0 * width + h * D, t0 * width + (h + 1) * D), ((l * KV + h) * tokens + t0) * D);
      }
    }
  }
  return prefix;
}

export const prefix = definePrefixKind<PrefixSettings>({
  type: 'prefix',
  peft: peftPromptBinding('PREFIX_TUNING', (config, problems) => {
    const peft = readPromptLearning(config, problems);
    return peft && { format: 'peft', peft };
  }),
  opendelta: {
    name: 'prefix',
    settings(config, problems) {
      const cfg = readSchema(OpenDeltaSchema, config, 'config.json', problems);
      if (!cfg) return null;
      if (cfg.reparameterize) {
        problems.unsupported(
          'reparameterize is true: OpenDelta then computes the prefix with an MLP at run time and does not save it; train with reparameterize=False (or save the computed past_key/past_value) to serve it',
        );
        return null;
      }
      return { format: 'opendelta', tokens: cfg.prefix_token_num };
    },
    key(name) {
      const m = /^(.+)\.prefix\.(past_key|past_value)$/.exec(name);
      return m ? { module: m[1], part: m[2] } : null;
    },
    expected: '<attention module>.prefix.past_key / .past_value',
  },
  prefix(modules, at) {
    const s = at.settings;
    if (s.format === 'opendelta') return fromOpenDelta(modules, s.tokens, at.backbone, at.problems);
    const t = onlyTensor(modules, 'prompt_embeddings', at.problems);
    return t && fromPeft(t, s.peft, at.backbone, at.problems);
  },
});
