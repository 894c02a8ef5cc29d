/**
 * The engine's graph: the backbone rewritten once at load time so that it
 * returns only the new K/V and the last position's logits (with their argmax
 * and, when a step asks, their top log-probabilities), and carries delta
 * sites on the linear modules a delta may target (which sites go where is the
 * delta kinds' plan: src/deltas/kinds).
 */
import type { Backbone } from '../backbone.js';
import { GraphEditor } from './editor.js';
import { insertDeltaSites, type GraphSite, type SiteLayout } from './delta-sites.js';
import { rewriteKvCache } from './kv-cache.js';
import { rewriteLastLogits } from './last-logits.js';
import { addLogprobs } from './logprobs.js';
import { addFiniteCheck } from './finite-check.js';

export interface EngineGraph {
  bytes: Uint8Array;
  sites: SiteLayout[];
  /** Layers whose attention reads past and new K/V without a Concat. */
  splitLayers: number;
}

/** `plan`: the sites on each linear module, in chain order (`planSites`; an empty map builds a graph without sites). */
export function buildEngineGraph(backbone: Backbone, plan: ReadonlyMap<string, readonly GraphSite[]>): EngineGraph {
  const g = new GraphEditor(backbone.source.model);
  const { splitLayers } = rewriteKvCache(g, backbone.io);
  rewriteLastLogits(g, backbone.io.vocabSize);
  addLogprobs(g, backbone.io.vocabSize);
  addFiniteCheck(g, backbone.io.vocabSize);
  const sites = insertDeltaSites(g, backbone.linear, plan);
  return { bytes: g.encodeModel(), sites, splitLayers };
}
