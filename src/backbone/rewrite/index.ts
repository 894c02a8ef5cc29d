/**
 * The engine's graph: the backbone rewritten once at load time so that it
 * returns only the new K/V and the last position's logits (with their argmax
 * and, when a step asks, their top log-probabilities), and carries delta
 * sites on the linear modules a delta may target.
 */
import type { Backbone } from '../backbone.js';
import { GraphEditor } from './editor.js';
import { insertDeltaSites, type SiteKind, type SiteLayout } from './delta-sites.js';
import { rewriteKvCache } from './kv-cache.js';
import { rewriteLastLogits } from './last-logits.js';
import { addLogprobs } from './logprobs.js';

/**
 * Which linear modules get which kinds of delta site. Defaults, by measurement
 * (README, "Deltas inside the graph"): LoRA and bias sites on every linear
 * (unused, they cost ~nothing), adapter sites on each block's output linears,
 * where OpenDelta puts bottleneck adapters by default.
 */
export interface SitePlanOptions {
  /** Module name suffixes (whole segments) that get each kind of site; `all` = every linear but lm_head. */
  lora?: string[] | 'all';
  adapter?: string[] | 'all';
  bias?: string[] | 'all';
}

export interface EngineGraph {
  bytes: Uint8Array;
  sites: SiteLayout[];
  /** Layers whose attention reads past and new K/V without a Concat. */
  splitLayers: number;
}

const matchesSuffix = (module: string, suffix: string) =>
  module === suffix || module.endsWith('.' + suffix);

export function planSites(backbone: Backbone, opts: SitePlanOptions = {}): Map<string, SiteKind[]> {
  const plan = new Map<string, SiteKind[]>();
  const candidates = backbone.linear.filter((m) => !/(^|\.)lm_head$/.test(m.name));
  const defaults = { lora: 'all', adapter: backbone.info.defaultTargets.adapter ?? 'all', bias: 'all' } as const;
  for (const kind of ['lora', 'adapter', 'bias'] as const) {
    const sel = opts[kind] ?? defaults[kind];
    for (const m of candidates) {
      if (sel === 'all' || sel.some((s) => matchesSuffix(m.name, s))) plan.set(m.name, [...(plan.get(m.name) ?? []), kind]);
    }
  }
  return plan;
}

export function buildEngineGraph(backbone: Backbone, opts: SitePlanOptions = {}): EngineGraph {
  const g = new GraphEditor(backbone.source.model);
  const { splitLayers } = rewriteKvCache(g, backbone.io);
  rewriteLastLogits(g, backbone.io.vocabSize);
  addLogprobs(g, backbone.io.vocabSize);
  const sites = insertDeltaSites(g, backbone.linear, planSites(backbone, opts));
  return { bytes: g.encodeModel(), sites, splitLayers };
}
