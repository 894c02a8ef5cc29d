/**
 * OpenDelta (thunlp/OpenDelta): config.json as `DeltaBase.save_finetuned`
 * writes it, weights in a .safetensors under the parameter names OpenDelta
 * gives its delta modules:
 *   lora     `<module>.lora.lora_A` [r, in], `<module>.lora.lora_B` [out, r], scale lora_alpha / lora_r
 *   adapter  `<module>.adapter.modulelist.{down_proj,up_proj}.{weight,bias}`, on the module's output
 *   bitfit   `<module>.bias`, the tuned bias itself
 */
import { z } from 'zod';
import type { CandidateDelta, CandidateSite, TargetEntry, Targets, Tensor } from '../candidate.js';
import { compileRegex, endsWithSegments, segmentPrefixes } from '../names.js';
import type { Problems } from '../problems.js';
import { parseSafetensors } from '../safetensors.js';
import type { Activation, DeltaType } from '../types.js';

export const OPENDELTA_CONFIG = 'config.json';

const SERVED: DeltaType[] = ['lora', 'adapter', 'bitfit'];
const ACTIVATIONS: Record<string, Activation> = {
  gelu_new: 'gelu_new',
  gelu: 'gelu',
  relu: 'relu',
  silu: 'silu',
  swish: 'silu',
};

// Defaults are OpenDelta's own (LoraConfig, AdapterConfig).
const ConfigSchema = z.looseObject({
  delta_type: z.string(),
  modified_modules: z.array(z.string()).nullish(),
  exclude_modules: z.array(z.string()).nullish(),
  common_structure: z.boolean().nullish(),
  lora_r: z.number().int().positive().default(8),
  lora_alpha: z.number().positive().default(16),
  bottleneck_dim: z.number().int().positive().default(24),
  non_linearity: z.string().default('gelu_new'),
});
type OpenDeltaConfig = z.infer<typeof ConfigSchema>;

function parseConfig(bytes: Uint8Array, problems: Problems, subject: string): OpenDeltaConfig {
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch (err) {
    problems.fail(subject, `${OPENDELTA_CONFIG} is not valid JSON: ${(err as Error).message}`);
  }
  const parsed = ConfigSchema.safeParse(json);
  if (!parsed.success) {
    for (const issue of parsed.error.issues) {
      problems.invalid(`${OPENDELTA_CONFIG}: ${issue.path.join('.') || '(root)'}: ${issue.message}`);
    }
    problems.throwIfAny(subject);
  }
  return parsed.data as OpenDeltaConfig;
}

/**
 * OpenDelta's name-based addressing (`endswith_in`): an entry matches a path it
 * equals or ends on whole segments; `[r]<regex>` must match a segment-aligned
 * tail of the path.
 */
function entryMatcher(entry: string, problems: Problems): TargetEntry | null {
  if (!entry.startsWith('[r]')) return { label: entry, matches: (p) => endsWithSegments(p, entry) };
  const re = compileRegex(`(?:^|\\.)(?:${entry.slice(3)})$`, false);
  if (typeof re === 'string') {
    problems.invalid(`modified_modules: ${re}`);
    return null;
  }
  return { label: entry, matches: (p) => re.test(p) };
}

/**
 * BitFit broadcasts: an entry naming a block (`attn`) tunes the bias of every
 * linear inside it, so a linear is covered when it or any enclosing module matches.
 */
function broadcast(entry: TargetEntry): TargetEntry {
  return { label: entry.label, matches: (p) => segmentPrefixes(p).some((prefix) => entry.matches(prefix)) };
}

function buildTargets(cfg: OpenDeltaConfig, type: DeltaType, problems: Problems): Targets {
  if (cfg.common_structure) {
    problems.unsupported(
      'common_structure is true: modified_modules use OpenDelta\'s common-structure names; save the delta with the backbone\'s own module names (common_structure=False)',
    );
  }
  if (cfg.modified_modules == null || cfg.modified_modules.length === 0) {
    problems.invalid(`${OPENDELTA_CONFIG} has no modified_modules; name the modules the delta modifies`);
  }
  const compile = (list: string[] | null | undefined) =>
    (list ?? []).flatMap((e) => entryMatcher(e, problems) ?? []).map((m) => (type === 'bitfit' ? broadcast(m) : m));
  const entries = compile(cfg.modified_modules);
  const excluded = compile(cfg.exclude_modules);
  return {
    field: 'modified_modules',
    entries,
    covers: (p) => entries.some((e) => e.matches(p)) && !excluded.some((e) => e.matches(p)),
  };
}

const KEYS: Record<DeltaType, RegExp> = {
  lora: /^(.+)\.lora\.lora_(A|B)$/,
  adapter: /^(.+)\.adapter\.modulelist\.(down_proj|up_proj)\.(weight|bias)$/,
  bitfit: /^(.+)\.bias$/,
};
const EXPECTED: Record<DeltaType, string> = {
  lora: '<module>.lora.lora_A and <module>.lora.lora_B',
  adapter: '<module>.adapter.modulelist.down_proj.weight/.bias and up_proj.weight/.bias',
  bitfit: '<module>.bias',
};

export function parseOpenDelta(
  files: Map<string, Uint8Array>,
  weightsFile: string,
  problems: Problems,
  subject: string,
): CandidateDelta {
  const cfg = parseConfig(files.get(OPENDELTA_CONFIG)!, problems, subject);
  const type = cfg.delta_type as DeltaType;
  if (!SERVED.includes(type)) {
    problems.fail(
      subject,
      `OpenDelta delta_type '${cfg.delta_type}' is not supported; deltaserve serves ${SERVED.join(', ')}`,
      true,
    );
  }
  const activation = type === 'adapter' ? ACTIVATIONS[cfg.non_linearity.toLowerCase()] ?? null : null;
  if (type === 'adapter' && activation === null) {
    problems.unsupported(
      `non_linearity '${cfg.non_linearity}' is not supported; deltaserve runs adapters with ${Object.keys(ACTIVATIONS).join(', ')}`,
    );
  }
  const targets = buildTargets(cfg, type, problems);
  const st = parseSafetensors(files.get(weightsFile)!, weightsFile, problems, subject);

  const byModule = new Map<string, Map<string, Tensor>>();
  for (const info of st.tensors.values()) {
    const m = KEYS[type].exec(info.name);
    if (!m) {
      problems.unsupported(
        `tensor '${info.name}' is not an OpenDelta ${type} parameter (expected ${EXPECTED[type]}); deltaserve serves the delta's own parameters only, so save without unfrozen backbone modules`,
      );
      continue;
    }
    if (type === 'bitfit' && m[1].endsWith('.bitfit')) {
      problems.unsupported(
        `tensor '${info.name}' is a BitFit bias on a non-linear module (a layer norm or head); deltaserve applies BitFit to linear modules only`,
      );
      continue;
    }
    const part = m.slice(2).join('.') || 'bias';
    const parts = byModule.get(m[1]) ?? new Map<string, Tensor>();
    parts.set(part, { name: info.name, shape: info.shape, data: st.read(info.name) });
    byModule.set(m[1], parts);
  }

  const sites: CandidateSite[] = [];
  for (const [module, parts] of byModule) {
    const need = (part: string): Tensor | null => {
      const t = parts.get(part);
      if (!t) problems.invalid(`module '${module}' has no ${part} tensor`);
      return t ?? null;
    };
    if (type === 'lora') {
      const [a, b] = [need('A'), need('B')];
      if (a && b) sites.push({ kind: 'lora', module, a, b, rank: cfg.lora_r, scale: cfg.lora_alpha / cfg.lora_r });
    } else if (type === 'adapter') {
      const [dw, db, uw, ub] = ['down_proj.weight', 'down_proj.bias', 'up_proj.weight', 'up_proj.bias'].map(need);
      if (dw && db && uw && ub) {
        sites.push({ kind: 'adapter', module, downWeight: dw, downBias: db, upWeight: uw, upBias: ub, bottleneck: cfg.bottleneck_dim });
      }
    } else {
      sites.push({ kind: 'bitfit', module, bias: parts.get('bias')! });
    }
  }
  return { type, format: 'opendelta', activation, sites, targets };
}
