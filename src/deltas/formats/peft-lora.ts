/**
 * PEFT LoRA: adapter_config.json + adapter_model.safetensors, as
 * `PeftModel.save_pretrained` writes them.
 */
import { z } from 'zod';
import type { CandidateDelta, CandidateSite, TargetEntry, Targets, Tensor } from '../candidate.js';
import { compileRegex, endsWithSegments } from '../names.js';
import type { Problems } from '../problems.js';
import { parseSafetensors } from '../safetensors.js';

export const PEFT_CONFIG = 'adapter_config.json';
export const PEFT_WEIGHTS = 'adapter_model.safetensors';
/** The prefix PeftModel puts before the base model's own module paths. */
const KEY_PREFIX = 'base_model.model.';
/** PEFT's fallback when layers_pattern is unset (peft.utils.constants.COMMON_LAYERS_PATTERN). */
const COMMON_LAYERS_PATTERN = ['layers', 'h', 'block', 'blocks', 'layer'];

const nameList = z.union([z.string(), z.array(z.string())]).nullish();
const ConfigSchema = z.looseObject({
  peft_type: z.string().nullish(),
  task_type: z.string().nullish(),
  r: z.number().int().positive().default(8),
  lora_alpha: z.number().positive().default(8),
  target_modules: nameList,
  exclude_modules: nameList,
  fan_in_fan_out: z.boolean().default(false),
  use_rslora: z.boolean().default(false),
  use_dora: z.boolean().default(false),
  bias: z.string().default('none'),
  modules_to_save: z.array(z.string()).nullish(),
  rank_pattern: z.record(z.string(), z.number().int().positive()).nullish(),
  alpha_pattern: z.record(z.string(), z.number().positive()).nullish(),
  layers_to_transform: z.union([z.number().int().nonnegative(), z.array(z.number().int().nonnegative())]).nullish(),
  layers_pattern: nameList,
  lora_bias: z.boolean().nullish(),
  layer_replication: z.unknown().nullish(),
  trainable_token_indices: z.unknown().nullish(),
  target_parameters: z.array(z.string()).nullish(),
});
type PeftConfig = z.infer<typeof ConfigSchema>;

function parseConfig(bytes: Uint8Array, problems: Problems, subject: string): PeftConfig {
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch (err) {
    problems.fail(subject, `${PEFT_CONFIG} is not valid JSON: ${(err as Error).message}`);
  }
  const parsed = ConfigSchema.safeParse(json);
  if (!parsed.success) {
    for (const issue of parsed.error.issues) {
      problems.invalid(`${PEFT_CONFIG}: ${issue.path.join('.') || '(root)'}: ${issue.message}`);
    }
    problems.throwIfAny(subject);
  }
  return parsed.data as PeftConfig;
}

/** Features whose effect deltaserve cannot reproduce: refusing beats serving something silently different. */
function refuseUnsupported(cfg: PeftConfig, problems: Problems): void {
  if (cfg.peft_type != null && cfg.peft_type !== 'LORA') {
    problems.unsupported(`peft_type is ${cfg.peft_type}; deltaserve serves PEFT adapters of peft_type LORA`);
  }
  // A missing task_type is PEFT's own default (a bare PeftModel), which still wraps a causal LM's modules.
  if (cfg.task_type != null && cfg.task_type !== 'CAUSAL_LM') {
    problems.unsupported(
      `task_type is ${cfg.task_type}; deltaserve generates text, so it serves adapters trained with task_type CAUSAL_LM`,
    );
  }
  if (cfg.use_dora) {
    problems.unsupported(
      'use_dora is true: DoRA rescales each weight column by a learned magnitude, which a LoRA bank cannot express; retrain with use_dora=false or merge the adapter into the model',
    );
  }
  if (cfg.modules_to_save && cfg.modules_to_save.length > 0) {
    problems.unsupported(
      `modules_to_save is ${JSON.stringify(cfg.modules_to_save)}: those modules are saved whole (a classifier head, embeddings), not as LoRA factors; deltaserve serves LoRA factors only, so retrain without modules_to_save`,
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

/**
 * PEFT's `check_target_module_exists`: a list entry matches the path or a
 * dot-segment suffix of it; a string is a regex that must match the whole path.
 */
function nameMatchers(field: string, spec: string | string[], problems: Problems): TargetEntry[] {
  if (typeof spec !== 'string') return spec.map((name) => ({ label: name, matches: (p) => endsWithSegments(p, name) }));
  const re = compileRegex(spec, true);
  if (typeof re === 'string') {
    problems.invalid(`${field}: ${re}`);
    return [];
  }
  return [{ label: spec, matches: (p) => re.test(p) }];
}

function layerFilter(cfg: PeftConfig): (path: string) => boolean {
  if (cfg.layers_to_transform == null) return () => true;
  const wanted = new Set(typeof cfg.layers_to_transform === 'number' ? [cfg.layers_to_transform] : cfg.layers_to_transform);
  const patterns =
    cfg.layers_pattern == null
      ? COMMON_LAYERS_PATTERN
      : typeof cfg.layers_pattern === 'string'
        ? [cfg.layers_pattern]
        : cfg.layers_pattern;
  const escaped = patterns.map((p) => p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'));
  const re = new RegExp(`(?:^|\\.)(?:${escaped.join('|')})\\.(\\d+)\\.`);
  return (path) => {
    const m = re.exec(path);
    return m !== null && wanted.has(Number(m[1]));
  };
}

function buildTargets(cfg: PeftConfig, problems: Problems): Targets {
  if (cfg.target_modules == null) {
    problems.invalid(`${PEFT_CONFIG} has no target_modules; save the adapter with PEFT, which writes the modules it adapted`);
  }
  const entries = cfg.target_modules == null ? [] : nameMatchers('target_modules', cfg.target_modules, problems);
  const excluded = cfg.exclude_modules == null ? [] : nameMatchers('exclude_modules', cfg.exclude_modules, problems);
  const inLayer = layerFilter(cfg);
  return {
    field: 'target_modules',
    entries,
    covers: (p) => entries.some((e) => e.matches(p)) && !excluded.some((e) => e.matches(p)) && inLayer(p),
  };
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

const FACTOR_KEY = /^(.*)\.lora_(A|B)\.weight$/;

export function parsePeftLora(files: Map<string, Uint8Array>, problems: Problems, subject: string): CandidateDelta {
  const cfg = parseConfig(files.get(PEFT_CONFIG)!, problems, subject);
  refuseUnsupported(cfg, problems);
  const targets = buildTargets(cfg, problems);
  const st = parseSafetensors(files.get(PEFT_WEIGHTS)!, PEFT_WEIGHTS, problems, subject);

  const factors = new Map<string, { a?: Tensor; b?: Tensor }>();
  for (const info of st.tensors.values()) {
    const m = FACTOR_KEY.exec(info.name);
    if (!m) {
      problems.unsupported(
        `tensor '${info.name}' is not a LoRA factor (lora_A/lora_B): a classifier head or a module saved whole (modules_to_save); deltaserve serves LoRA factors only, so remove it or retrain without it`,
      );
      continue;
    }
    const module = m[1].startsWith(KEY_PREFIX) ? m[1].slice(KEY_PREFIX.length) : m[1];
    const entry = factors.get(module) ?? {};
    entry[m[2] === 'A' ? 'a' : 'b'] = { name: info.name, shape: info.shape, data: st.read(info.name) };
    factors.set(module, entry);
  }

  const sites: CandidateSite[] = [];
  for (const [module, { a, b }] of factors) {
    if (!a || !b) {
      problems.invalid(`module '${module}' has lora_${a ? 'A' : 'B'} but no lora_${a ? 'B' : 'A'}`);
      continue;
    }
    const rank = patternValue(cfg.rank_pattern, module, cfg.r);
    const alpha = patternValue(cfg.alpha_pattern, module, cfg.lora_alpha);
    // fan_in_fan_out only transposes the base weight (GPT-2's Conv1D) when merging; lora_A/lora_B are nn.Linear weights either way.
    const scale = cfg.use_rslora ? alpha / Math.sqrt(rank) : alpha / rank;
    sites.push({ kind: 'lora', module, a, b, rank, scale });
  }
  return { type: 'lora', format: 'peft', activation: null, sites, targets };
}
