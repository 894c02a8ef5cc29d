/**
 * Every kind of delta deltaserve serves: one line each. A new kind is its own
 * file in this folder, a line here, and its tests.
 */
import type { GraphSite } from '../../backbone/rewrite/delta-sites.js';
import type { Backbone } from '../../backbone/backbone.js';
import { adapter } from './adapter.js';
import { bitfit } from './bitfit.js';
import { compacter } from './compacter.js';
import { ia3 } from './ia3.js';
import type { AnyKind, DeltaKind, PrefixKind } from './kind.js';
import { lora } from './lora.js';
import { lowRankAdapter } from './low-rank-adapter.js';
import { parallelAdapter } from './parallel-adapter.js';
import { prefix } from './prefix.js';
import { promptTuning, pTuning } from './prompt.js';

export const DELTA_KINDS: readonly DeltaKind[] = [
  lora,
  adapter,
  bitfit,
  ia3,
  compacter,
  lowRankAdapter,
  parallelAdapter,
];

/** Prompt-learning kinds: served as a KV prefix per row, no graph site. */
export const PREFIX_KINDS: readonly PrefixKind[] = [prefix, promptTuning, pTuning];

/** Every kind, as the formats look them up by name. */
export const ALL_KINDS: readonly AnyKind[] = [...DELTA_KINDS, ...PREFIX_KINDS];

/** The graph sites the kinds are served through, in the order a module's chain applies them. */
export const GRAPH_SITES: readonly GraphSite[] = [...new Set(DELTA_KINDS.flatMap((k) => [k.site, ...(k.otherSites ?? [])]))];

export function graphSite(name: string): GraphSite {
  const site = GRAPH_SITES.find((s) => s.name === name);
  if (!site) throw new Error(`no graph site '${name}'`);
  return site;
}

/** Which modules get each graph site (DELTASERVE_SITES): name suffixes (whole segments), or `all` linears but lm_head. */
export type SitePlan = Partial<Record<string, string[] | 'all'>>;

const matchesSuffix = (module: string, suffix: string) => module === suffix || module.endsWith('.' + suffix);

/** The sites on each linear module: those the plan names, each site's defaults for the rest. */
export function planSites(backbone: Backbone, plan: SitePlan = {}): Map<string, GraphSite[]> {
  const out = new Map<string, GraphSite[]>();
  const candidates = backbone.linear.filter((m) => !/(^|\.)lm_head$/.test(m.name));
  for (const site of GRAPH_SITES) {
    const sel = plan[site.name] ?? site.defaultModules(backbone.info);
    for (const m of candidates) {
      if (sel === 'all' || sel.some((s) => matchesSuffix(m.name, s))) out.set(m.name, [...(out.get(m.name) ?? []), site]);
    }
  }
  return out;
}
