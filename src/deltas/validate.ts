/**
 * Checks a parsed delta against the backbone before anything is stored, and
 * builds the bank-ready LoadedDelta. Every problem is collected so one 422
 * tells the user everything that is wrong.
 */
import type { BackboneInfo, LinearModule } from '../backbone/types.js';
import type { CandidateDelta, CandidateSite, Tensor } from './candidate.js';
import { sameModule } from './names.js';
import type { Problems } from './problems.js';
import type { DeltaSite, DeltaType, LoadedDelta } from './types.js';

export const DEFAULT_MAX_RANK = 64;

export type ValidDelta = Omit<LoadedDelta, 'id' | 'version'>;

export interface SiteSummary {
  module: string;
  kind: DeltaType;
  shapes: number[][];
}

/** Leaf module names that identify a model family, to explain a delta trained on a different model. */
const FAMILY_LEAVES: Record<string, string[]> = {
  gpt2: ['c_attn', 'c_proj', 'c_fc'],
  llama: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
  bert: ['query', 'key', 'value', 'dense'],
  t5: ['q', 'k', 'v', 'o', 'wi', 'wo', 'wi_0', 'wi_1'],
};

const leaf = (name: string) => name.slice(name.lastIndexOf('.') + 1);
const fmt = (shape: number[]) => `[${shape.join(', ')}]`;

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

function expectShape(problems: Problems, mod: LinearModule, what: string, t: Tensor, want: number[]): boolean {
  if (t.shape.length === want.length && t.shape.every((d, i) => d === want[i])) return true;
  problems.invalid(
    `module '${mod.name}' (in ${mod.inFeatures}, out ${mod.outFeatures}): ${what} '${t.name}' is ${fmt(t.shape)}, expected ${fmt(want)}`,
  );
  return false;
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

function tensorsOf(site: CandidateSite): Tensor[] {
  if (site.kind === 'lora') return [site.a, site.b];
  if (site.kind === 'adapter') return [site.downWeight, site.downBias, site.upWeight, site.upBias];
  return [site.bias];
}

/** Checks one site's shapes against its module; returns its rank (0 for BitFit) or null when the shapes do not fit. */
function checkShapes(site: CandidateSite, mod: LinearModule, backbone: BackboneInfo, problems: Problems): number | null {
  const out = mod.outFeatures;
  if (site.kind === 'lora') {
    const r = site.rank;
    const ok = [expectShape(problems, mod, 'lora_A', site.a, [r, mod.inFeatures]), expectShape(problems, mod, 'lora_B', site.b, [out, r])];
    return ok.every(Boolean) ? r : null;
  }
  if (site.kind === 'adapter') {
    const n = site.bottleneck;
    const ok = [
      expectShape(problems, mod, 'down_proj.weight', site.downWeight, [n, out]),
      expectShape(problems, mod, 'down_proj.bias', site.downBias, [n]),
      expectShape(problems, mod, 'up_proj.weight', site.upWeight, [out, n]),
      expectShape(problems, mod, 'up_proj.bias', site.upBias, [out]),
    ];
    return ok.every(Boolean) ? n : null;
  }
  if (!expectShape(problems, mod, 'bias', site.bias, [out])) return null;
  const own = backbone.biasOf(mod.name);
  if (own && own.length !== out) {
    problems.invalid(`module '${mod.name}': the backbone's bias has ${own.length} values but the module has ${out} outputs`);
    return null;
  }
  return 0;
}

/** [rows, cols] row-major → [cols, rows] row-major, times a scale, into a fresh array. */
function transpose(src: Float32Array, rows: number, cols: number, scale = 1): Float32Array {
  const out = new Float32Array(rows * cols);
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) out[j * rows + i] = src[i * cols + j] * scale;
  }
  return out;
}

function build(site: CandidateSite, mod: LinearModule, backbone: BackboneInfo): DeltaSite {
  const out = mod.outFeatures;
  if (site.kind === 'lora') {
    const r = site.rank;
    return {
      kind: 'lora',
      module: mod.name,
      rank: r,
      a: transpose(site.a.data, r, mod.inFeatures),
      b: transpose(site.b.data, out, r, site.scale),
    };
  }
  if (site.kind === 'adapter') {
    const n = site.bottleneck;
    return {
      kind: 'adapter',
      module: mod.name,
      bottleneck: n,
      down: transpose(site.downWeight.data, n, out),
      downBias: site.downBias.data.slice(),
      up: transpose(site.upWeight.data, out, n),
      upBias: site.upBias.data.slice(),
    };
  }
  const own = backbone.biasOf(mod.name);
  // slice() also detaches the result from the file buffer a zero-copy read points into.
  const bias = site.bias.data.slice();
  if (own) for (let i = 0; i < out; i++) bias[i] -= own[i];
  return { kind: 'bitfit', module: mod.name, bias };
}

export function siteSummary(site: DeltaSite): SiteSummary {
  const shapes: number[][] =
    site.kind === 'lora'
      ? [[site.a.length / site.rank, site.rank], [site.rank, site.b.length / site.rank]]
      : site.kind === 'adapter'
        ? [[site.down.length / site.bottleneck, site.bottleneck], [site.bottleneck], [site.bottleneck, site.up.length / site.bottleneck], [site.upBias.length]]
        : [[site.bias.length]];
  return { module: site.module, kind: site.kind, shapes };
}

export function validateDelta(
  delta: CandidateDelta,
  backbone: BackboneInfo,
  opts: { maxRank: number },
  problems: Problems,
  subject: string,
): ValidDelta {
  const resolved = delta.sites.map((s) => ({ site: s, matches: resolve(s.module, backbone) }));
  const unresolved = resolved.filter((r) => r.matches.length === 0).map((r) => r.site.module);
  const unmatchedEntries = delta.targets.entries.filter((e) => !backbone.modules.some((m) => e.matches(m.name)));

  const mismatch = familyMismatch([...unresolved, ...unmatchedEntries.map((e) => e.label)], backbone);
  if (mismatch) problems.invalid(mismatch);
  if (delta.sites.length === 0) problems.invalid('the delta has no weights for any module');
  for (const e of unmatchedEntries) {
    problems.invalid(`${delta.targets.field} entry '${e.label}' matches no linear module of the backbone '${backbone.name}'`);
  }
  for (const name of unresolved) problems.invalid(`module '${name}' has weights but matches no module of the backbone '${backbone.name}'`);

  const placed = new Map<string, { site: CandidateSite; mod: LinearModule }>();
  let maxRank = 0;
  let rankAt = '';
  for (const { site, matches } of resolved) {
    if (matches.length > 1) {
      problems.invalid(`module '${site.module}' is ambiguous: it matches ${matches.map((m) => m.name).join(', ')}`);
      continue;
    }
    if (matches.length === 0) continue;
    const mod = matches[0];
    if (placed.has(mod.name)) {
      problems.invalid(`modules '${placed.get(mod.name)!.site.module}' and '${site.module}' both resolve to '${mod.name}'`);
      continue;
    }
    placed.set(mod.name, { site, mod });
    if (!delta.targets.covers(mod.name)) {
      problems.invalid(`module '${site.module}' has weights but ${delta.targets.field} does not select it`);
    }
    const rank = checkShapes(site, mod, backbone, problems);
    if (rank !== null && rank > maxRank) [maxRank, rankAt] = [rank, mod.name];
    for (const t of tensorsOf(site)) checkFinite(problems, t);
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
  const sites = [...placed.values()]
    .sort((x, y) => order.get(x.mod.name)! - order.get(y.mod.name)!)
    .map(({ site, mod }) => build(site, mod, backbone));
  const bytes = sites.reduce((n, s) => n + siteBytes(s), 0);
  return { type: delta.type, format: delta.format, rank: maxRank, activation: delta.activation, sites, bytes };
}

function siteBytes(s: DeltaSite): number {
  if (s.kind === 'lora') return s.a.byteLength + s.b.byteLength;
  if (s.kind === 'adapter') return s.down.byteLength + s.downBias.byteLength + s.up.byteLength + s.upBias.byteLength;
  return s.bias.byteLength;
}
