/**
 * Checks a parsed delta against the backbone before anything is stored, and
 * builds the bank-ready LoadedDelta. Every problem is collected so one 422
 * tells the user everything that is wrong.
 */
import { sliceDims } from '../backbone/rewrite/delta-sites.js';
import type { BackboneInfo, LinearModule } from '../backbone/types.js';
import type { CandidateDelta, Tensor } from './candidate.js';
import { graphSite } from './kinds/index.js';
import { isPrefixKind, type PrefixKind, type SiteRows } from './kinds/kind.js';
import { sameModule } from './names.js';
import type { Problems } from './problems.js';
import type { DeltaSite, LoadedDelta, SiteSummary } from './types.js';

export const DEFAULT_MAX_RANK = 64;

export type ValidDelta = Omit<LoadedDelta, 'id' | 'version'>;

/** Leaf module names that identify a model family, to explain a delta trained on a different model. */
const FAMILY_LEAVES: Record<string, string[]> = {
  gpt2: ['c_attn', 'c_proj', 'c_fc'],
  llama: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
  bert: ['query', 'key', 'value', 'dense'],
  t5: ['q', 'k', 'v', 'o', 'wi', 'wo', 'wi_0', 'wi_1'],
};

const leaf = (name: string) => name.slice(name.lastIndexOf('.') + 1);

function familyMismatch(names: string[], backbone: BackboneInfo): string | null {
  const leaves = [...new Set(names.map(leaf))];
  if (leaves.length === 0) return null;
  const own = FAMILY_LEAVES[backbone.family] ?? [];
  if (leaves.every((l) => own.includes(l))) return null;
  const family = Object.keys(FAMILY_LEAVES).find((f) => f !== backbone.family && leaves.every((l) => FAMILY_LEAVES[f].includes(l)));
  if (!family) return null;
  const backboneLeaves = [...new Set(backbone.modules.map((m) => leaf(m.name)))];
  return (
    `this delta was made for a ${family} model (its modules are named ${leaves.join(', ')}), ` +
    `but the backbone '${backbone.name}' is a ${backbone.family} model (its linear modules are named ${backboneLeaves.join(', ')}); ` +
    `register it on a ${family} backbone`
  );
}

function resolve(name: string, backbone: BackboneInfo): LinearModule[] {
  const exact = backbone.modules.find((m) => m.name === name);
  return exact ? [exact] : backbone.modules.filter((m) => sameModule(m.name, name));
}

function checkFinite(problems: Problems, t: Tensor): void {
  let bad = 0;
  let first = -1;
  for (let i = 0; i < t.data.length; i++) {
    if (!Number.isFinite(t.data[i])) {
      if (first < 0) first = i;
      bad++;
    }
  }
  if (bad > 0) problems.invalid(`tensor '${t.name}' has ${bad} non-finite value${bad > 1 ? 's' : ''} (NaN or Inf), the first at index ${first}`);
}

/** The one site a prompt-learning delta shows: its K/V prefix, [layers·2, tokens, K/V width] as served. */
const PREFIX_SITE = 'kv_prefix';

/** What GET /v1/deltas/{id} shows of each site: its kind, its graph site and its parameters' shapes as served. */
export function summarize(delta: ValidDelta, backbone: BackboneInfo): SiteSummary[] {
  if (delta.prefix) {
    const p = delta.prefix;
    const width = p.keys.length / (backbone.numLayers * p.tokens);
    const shapes = [[backbone.numLayers * 2, p.tokens, width], ...(p.embeds ? [[p.tokens, p.embeds.length / p.tokens]] : [])];
    return [{ module: 'past_key_values', kind: delta.type, site: PREFIX_SITE, shapes }];
  }
  return delta.sites.map((s) => {
    const mod = backbone.modules.find((m) => m.name === s.module)!;
    const shapes = graphSite(s.site).banks
      .filter((b) => !b.selector && s.data[b.key])
      .map((b) => {
        const [a, c] = sliceDims(b, mod, s.axes);
        // A leading 1 is the bank's broadcast over positions, not part of the parameter.
        return b.dims(mod)[0] === 1 ? [c] : [a, c];
      });
    return { module: s.module, kind: delta.type, site: s.site, shapes };
  });
}

/** A prompt-learning delta: its kind checks the tensors and lays out the prefix (no modules, no rank). */
function validatePrefix(delta: CandidateDelta, kind: PrefixKind, backbone: BackboneInfo, problems: Problems, subject: string): ValidDelta {
  for (const parts of delta.modules.values()) for (const t of parts.values()) checkFinite(problems, t);
  const prefix = kind.prefix(delta.modules, { settings: delta.settings, backbone, problems });
  problems.throwIfAny(subject);
  const bytes = [prefix!.keys, prefix!.values, prefix!.embeds].reduce((n, a) => n + (a?.byteLength ?? 0), 0);
  return { type: kind.type, format: delta.format, rank: 0, sites: [], prefix: prefix!, bytes };
}

export function validateDelta(
  delta: CandidateDelta,
  backbone: BackboneInfo,
  opts: { maxRank: number },
  problems: Problems,
  subject: string,
): ValidDelta {
  const kind = delta.kind;
  if (isPrefixKind(kind)) return validatePrefix(delta, kind, backbone, problems, subject);
  const resolved = [...delta.modules].map(([name, parts]) => ({ name, parts, matches: resolve(name, backbone) }));
  const unresolved = resolved.filter((r) => r.matches.length === 0).map((r) => r.name);
  const unmatchedEntries = delta.targets.entries.filter((e) => !backbone.modules.some((m) => e.matches(m.name)));

  const mismatch = familyMismatch([...unresolved, ...unmatchedEntries.map((e) => e.label)], backbone);
  if (mismatch) problems.invalid(mismatch);
  if (delta.modules.size === 0) problems.invalid('the delta has no weights for any module');
  for (const e of unmatchedEntries) {
    problems.invalid(`${delta.targets.field} entry '${e.label}' matches no linear module of the backbone '${backbone.name}'`);
  }
  for (const name of unresolved) problems.invalid(`module '${name}' has weights but matches no module of the backbone '${backbone.name}'`);

  const placed = new Map<string, { name: string; mod: LinearModule; rows: SiteRows | null }>();
  let maxRank = 0;
  let rankAt = '';
  for (const { name, parts, matches } of resolved) {
    if (matches.length > 1) {
      problems.invalid(`module '${name}' is ambiguous: it matches ${matches.map((m) => m.name).join(', ')}`);
      continue;
    }
    if (matches.length === 0) continue;
    const mod = matches[0];
    if (placed.has(mod.name)) {
      problems.invalid(`modules '${placed.get(mod.name)!.name}' and '${name}' both resolve to '${mod.name}'`);
      continue;
    }
    if (!delta.targets.covers(mod.name)) {
      problems.invalid(`module '${name}' has weights but ${delta.targets.field} does not select it`);
    }
    const rows = kind.build(parts, { module: mod, name, settings: delta.settings, backbone, problems });
    placed.set(mod.name, { name, mod, rows });
    if (rows && rows.rank > maxRank) [maxRank, rankAt] = [rows.rank, mod.name];
    for (const t of parts.values()) checkFinite(problems, t);
  }
  if (maxRank > opts.maxRank) {
    problems.invalid(`rank ${maxRank} (module '${rankAt}') exceeds this server's maximum rank ${opts.maxRank}`);
  }
  for (const mod of backbone.modules) {
    if (delta.targets.covers(mod.name) && !placed.has(mod.name)) {
      problems.invalid(`module '${mod.name}' is selected by ${delta.targets.field} but the weights have nothing for it`);
    }
  }
  problems.throwIfAny(subject);

  const order = new Map(backbone.modules.map((m, i) => [m.name, i]));
  const sites: DeltaSite[] = [...placed.values()]
    .sort((x, y) => order.get(x.mod.name)! - order.get(y.mod.name)!)
    .map(({ mod, rows }) => ({ module: mod.name, site: (rows!.site ?? kind.site).name, axes: rows!.axes ?? { rank: rows!.rank }, data: rows!.data }));
  const bytes = sites.reduce((n, s) => n + Object.values(s.data).reduce((m, d) => m + d.byteLength, 0), 0);
  return { type: kind.type, format: delta.format, rank: maxRank, sites, bytes };
}
