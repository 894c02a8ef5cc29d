/**
 * LoRA: y + s·(x·Aᵀ)·Bᵀ on a linear module, and its graph site.
 *
 * PEFT (`peft_type` LORA): `<module>.lora_A.weight` [r, in] and
 * `.lora_B.weight` [out, r]; scale lora_alpha / r (/ √r with rsLoRA), per
 * module through rank_pattern and alpha_pattern. OpenDelta (`lora`):
 * `<module>.lora.lora_A` / `.lora_B`, scale lora_alpha / lora_r. Both are
 * nn.Linear-layout factors whatever the module (fan_in_fan_out only
 * transposes GPT-2's Conv1D weight when PEFT merges).
 */
import { z } from 'zod';
import type { GraphSite } from '../../backbone/rewrite/delta-sites.js';
import { OPENDELTA_CONFIG, PEFT_CONFIG } from '../formats/files.js';
import { compileRegex } from '../names.js';
import { readSchema, type Problems } from '../problems.js';
import { defineKind, expectShape, needParts, transposed } from './kind.js';

export const loraSite: GraphSite = {
  name: 'lora',
  banks: [
    { key: 'lora_a', dims: (m) => [m.inFeatures, 'rank'], neutral: 0 },
    { key: 'lora_b', dims: (m) => ['rank', m.outFeatures], neutral: 0 },
  ],
  // Unused, a LoRA site is fed a zero-size rank and costs next to nothing: on every linear.
  defaultModules: () => 'all',
  output: ({ g, x, y, bank }) => g.op('Add', [y, g.op('MatMul', [g.op('MatMul', [x, bank('lora_a')]), bank('lora_b')])]),
};

/** The rank and scale of each module's factors. */
type LoraSettings = (module: string) => { rank: number; scale: number };

const PeftSettings = z.looseObject({
  r: z.number().int().positive().default(8),
  lora_alpha: z.number().positive().default(8),
  use_rslora: z.boolean().default(false),
  use_dora: z.boolean().default(false),
  bias: z.string().default('none'),
  rank_pattern: z.record(z.string(), z.number().int().positive()).nullish(),
  alpha_pattern: z.record(z.string(), z.number().positive()).nullish(),
  lora_bias: z.boolean().nullish(),
  layer_replication: z.unknown().nullish(),
  trainable_token_indices: z.unknown().nullish(),
  target_parameters: z.array(z.string()).nullish(),
});
type PeftLoraConfig = z.infer<typeof PeftSettings>;

/** Features whose effect a LoRA bank cannot reproduce: refusing beats serving something silently different. */
function refuseUnsupported(cfg: PeftLoraConfig, problems: Problems): void {
  if (cfg.use_dora) {
    problems.unsupported(
      'use_dora is true: DoRA rescales each weight column by a learned magnitude, which a LoRA bank cannot express; retrain with use_dora=false or merge the adapter into the model',
    );
  }
  if (cfg.bias !== 'none') {
    problems.unsupported(
      `bias is "${cfg.bias}": the adapter also tunes the backbone's biases; deltaserve serves LoRA adapters with bias "none" (use an OpenDelta bitfit delta for bias tuning)`,
    );
  }
  if (cfg.lora_bias) problems.unsupported('lora_bias is true: lora_B has a bias; deltaserve serves LoRA factors without bias');
  if (cfg.layer_replication != null) problems.unsupported('layer_replication is set; deltaserve cannot duplicate backbone layers');
  if (cfg.trainable_token_indices != null) {
    problems.unsupported('trainable_token_indices is set: the adapter retrains token embeddings, which deltaserve does not serve');
  }
  if (cfg.target_parameters && cfg.target_parameters.length > 0) {
    problems.unsupported('target_parameters is set: LoRA on raw parameters (not modules) is not supported');
  }
}

/** PEFT's `get_pattern_key`: the first pattern equal to the module path or matching a segment suffix of it. */
function patternValue(pattern: Record<string, number> | null | undefined, module: string, fallback: number): number {
  for (const [key, value] of Object.entries(pattern ?? {})) {
    if (key === module) return value;
    const re = compileRegex(`(?:.*\\.)?(?:${key})`, true);
    if (typeof re !== 'string' && re.test(module)) return value;
  }
  return fallback;
}

// OpenDelta's LoraConfig defaults.
const OpenDeltaSettings = z.looseObject({
  lora_r: z.number().int().positive().default(8),
  lora_alpha: z.number().positive().default(16),
});

const suffixKey = (re: RegExp) => (name: string) => {
  const m = re.exec(name);
  return m ? { module: m[1], part: `lora_${m[2]}` } : null;
};

export const lora = defineKind<LoraSettings>({
  type: 'lora',
  site: loraSite,
  peft: {
    name: 'LORA',
    settings(config, problems) {
      const cfg = readSchema(PeftSettings, config, PEFT_CONFIG, problems);
      if (!cfg) return null;
      refuseUnsupported(cfg, problems);
      return (module) => {
        const rank = patternValue(cfg.rank_pattern, module, cfg.r);
        const alpha = patternValue(cfg.alpha_pattern, module, cfg.lora_alpha);
        return { rank, scale: cfg.use_rslora ? alpha / Math.sqrt(rank) : alpha / rank };
      };
    },
    key: suffixKey(/^(.*)\.lora_(A|B)\.weight$/),
    expected: '<module>.lora_A.weight and <module>.lora_B.weight',
  },
  opendelta: {
    name: 'lora',
    settings(config, problems) {
      const cfg = readSchema(OpenDeltaSettings, config, OPENDELTA_CONFIG, problems);
      return cfg && (() => ({ rank: cfg.lora_r, scale: cfg.lora_alpha / cfg.lora_r }));
    },
    key: suffixKey(/^(.+)\.lora\.lora_(A|B)$/),
    expected: '<module>.lora.lora_A and <module>.lora.lora_B',
  },
  build(parts, at) {
    const got = needParts(parts, ['lora_A', 'lora_B'], at);
    if (!got) return null;
    const [a, b] = got;
    const { rank: r, scale } = at.settings(at.name);
    const { inFeatures: inF, outFeatures: out } = at.module;
    const ok = [expectShape(at, 'lora_A', a, [r, inF]), expectShape(at, 'lora_B', b, [out, r])];
    if (!ok.every(Boolean)) return null;
    return { rank: r, data: { lora_a: transposed(a.data, r, inF), lora_b: transposed(b.data, out, r, scale) } };
  },
});
