/**
 * PEFT: adapter_config.json + adapter_model.safetensors, as
 * `PeftModel.save_pretrained` writes them. This file reads what every PEFT
 * method shares (peft_type, task_type, target_modules and the layer filters,
 * modules_to_save, the `base_model.model.` key prefix); the kind named by
 * peft_type reads its own fields and tensors (src/deltas/kinds).
 */
import { z } from 'zod';
import type { CandidateDelta, TargetEntry, Targets } from '../candidate.js';
import { ALL_KINDS } from '../kinds/index.js';
import { isPrefixKind } from '../kinds/kind.js';
import { compileRegex, endsWithSegments } from '../names.js';
import { readSchema, type Problems } from '../problems.js';
import { PEFT_CONFIG, PEFT_WEIGHTS } from './files.js';
import { groupTensors, readConfig } from './read.js';

/** The prefix PeftModel puts before the base model's own module paths. */
const KEY_PREFIX = 'base_model.model.';
/** PEFT's fallback when layers_pattern is unset (peft.utils.constants.COMMON_LAYERS_PATTERN). */
const COMMON_LAYERS_PATTERN = ['layers', 'h', 'block', 'blocks', 'layer'];

const nameList = z.union([z.string(), z.array(z.string())]).nullish();
const ConfigSchema = z.looseObject({
  peft_type: z.string().nullish(),
  task_type: z.string().nullish(),
  target_modules: nameList,
  exclude_modules: nameList,
  modules_to_save: z.array(z.string()).nullish(),
  layers_to_transform: z.union([z.number().int().nonnegative(), z.array(z.number().int().nonnegative())]).nullish(),
  layers_pattern: nameList,
});
type PeftConfig = z.infer<typeof ConfigSchema>;

/** Shared features whose effect deltaserve cannot reproduce: refusing beats serving something silently different. */
function refuseUnsupported(cfg: PeftConfig, problems: Problems): void {
  // A missing task_type is PEFT's own default (a bare PeftModel), which still wraps a causal LM's modules.
  if (cfg.task_type != null && cfg.task_type !== 'CAUSAL_LM') {
    problems.unsupported(
      `task_type is ${cfg.task_type}; deltaserve generates text, so it serves adapters trained with task_type CAUSAL_LM`,
    );
  }
  if (cfg.modules_to_save && cfg.modules_to_save.length > 0) {
    problems.unsupported(
      `modules_to_save is ${JSON.stringify(cfg.modules_to_save)}: those modules are saved whole (a classifier head, embeddings), not as delta parameters; deltaserve serves the delta's own parameters only, so retrain without modules_to_save`,
    );
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

const NO_TARGETS: Targets = { field: 'target_modules', entries: [], covers: () => false };

const SERVED = ALL_KINDS.flatMap((k) => (k.peft ? [k.peft.name] : []));

export function parsePeft(files: Map<string, Uint8Array>, problems: Problems, subject: string): CandidateDelta {
  const raw = readConfig(files.get(PEFT_CONFIG)!, PEFT_CONFIG, problems, subject);
  const cfg = readSchema(ConfigSchema, raw, PEFT_CONFIG, problems);
  if (!cfg) problems.throwIfAny(subject);
  const common = cfg!;
  // PEFT's own default peft_type is LORA.
  const peftType = common.peft_type ?? 'LORA';
  refuseUnsupported(common, problems);
  const kind = ALL_KINDS.find((k) => k.peft?.name === peftType);
  if (!kind) return problems.fail(subject, `peft_type is ${peftType}; deltaserve serves PEFT adapters of peft_type ${SERVED.join(', ')}`, true);
  const binding = kind.peft!;
  const settings = binding.settings(raw, problems);
  if (settings === null) problems.throwIfAny(subject);
  // Prompt learning adapts no module: its config has no target_modules.
  const targets = isPrefixKind(kind) ? NO_TARGETS : buildTargets(common, problems);
  const modules = groupTensors(files.get(PEFT_WEIGHTS)!, PEFT_WEIGHTS, binding, problems, subject,
    { what: `a PEFT ${peftType} adapter`, advice: 'a classifier head or a module saved whole (modules_to_save) is not served, so remove it or retrain without it' },
    (name) => (name.startsWith(KEY_PREFIX) ? name.slice(KEY_PREFIX.length) : name));
  return { kind, format: 'peft', settings, modules, targets };
}
