/**
 * OpenDelta (thunlp/OpenDelta): config.json as `DeltaBase.save_finetuned`
 * writes it, weights in a .safetensors under the parameter names OpenDelta
 * gives its delta modules. This file reads what every OpenDelta kind shares
 * (delta_type, OpenDelta's name-based addressing); the kind named by
 * delta_type reads its own fields and tensors (src/deltas/kinds).
 */
import { z } from 'zod';
import type { CandidateDelta, TargetEntry, Targets } from '../candidate.js';
import { ALL_KINDS } from '../kinds/index.js';
import { isPrefixKind } from '../kinds/kind.js';
import { compileRegex, endsWithSegments, segmentPrefixes } from '../names.js';
import { readSchema, type Problems } from '../problems.js';
import { OPENDELTA_CONFIG } from './files.js';
import { groupTensors, readConfig } from './read.js';

const ConfigSchema = z.looseObject({
  delta_type: z.string(),
  modified_modules: z.array(z.string()).nullish(),
  exclude_modules: z.array(z.string()).nullish(),
  common_structure: z.boolean().nullish(),
});
type OpenDeltaConfig = z.infer<typeof ConfigSchema>;

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

/** An entry naming a block (`attn`) also covers every linear inside it. */
function broadcast(entry: TargetEntry): TargetEntry {
  return { label: entry.label, matches: (p) => segmentPrefixes(p).some((prefix) => entry.matches(prefix)) };
}

function buildTargets(cfg: OpenDeltaConfig, broadcastTargets: boolean, problems: Problems): Targets {
  if (cfg.common_structure) {
    problems.unsupported(
      'common_structure is true: modified_modules use OpenDelta\'s common-structure names; save the delta with the backbone\'s own module names (common_structure=False)',
    );
  }
  if (cfg.modified_modules == null || cfg.modified_modules.length === 0) {
    problems.invalid(`${OPENDELTA_CONFIG} has no modified_modules; name the modules the delta modifies`);
  }
  const compile = (list: string[] | null | undefined) =>
    (list ?? []).flatMap((e) => entryMatcher(e, problems) ?? []).map((m) => (broadcastTargets ? broadcast(m) : m));
  const entries = compile(cfg.modified_modules);
  const excluded = compile(cfg.exclude_modules);
  return {
    field: 'modified_modules',
    entries,
    covers: (p) => entries.some((e) => e.matches(p)) && !excluded.some((e) => e.matches(p)),
  };
}

const SERVED = ALL_KINDS.flatMap((k) => (k.opendelta ? [k.opendelta.name] : []));

export function parseOpenDelta(
  files: Map<string, Uint8Array>,
  weightsFile: string,
  problems: Problems,
  subject: string,
): CandidateDelta {
  const raw = readConfig(files.get(OPENDELTA_CONFIG)!, OPENDELTA_CONFIG, problems, subject);
  const parsed = readSchema(ConfigSchema, raw, OPENDELTA_CONFIG, problems);
  if (!parsed) problems.throwIfAny(subject);
  const cfg = parsed!;
  const kind = ALL_KINDS.find((k) => k.opendelta?.name === cfg.delta_type);
  if (!kind) {
    return problems.fail(subject, `OpenDelta delta_type '${cfg.delta_type}' is not supported; deltaserve serves ${SERVED.join(', ')}`, true);
  }
  const binding = kind.opendelta!;
  const settings = binding.settings(raw, problems);
  if (settings === null) problems.throwIfAny(subject);
  // A prefix's modified_modules name attention blocks, a soft prompt's the root: not linear modules, which
  // is what targets select; the prefix kind checks its tensors' modules itself.
  const targets = isPrefixKind(kind)
    ? { field: 'modified_modules', entries: [], covers: () => false }
    : buildTargets(cfg, !!binding.broadcastTargets, problems);
  const modules = groupTensors(files.get(weightsFile)!, weightsFile, binding, problems, subject, {
    what: `an OpenDelta ${cfg.delta_type} delta`,
    advice: 'deltaserve serves the delta\'s own parameters only, so save without unfrozen backbone modules',
  });
  return { kind, format: 'opendelta', settings, modules, targets };
}
