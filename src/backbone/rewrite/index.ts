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
import { rewriteKvCache, type LayerKvPath } from './kv-cache.js';
import { rewriteLastLogits } from './last-logits.js';
import { addLogprobs } from './logprobs.js';
import { addFiniteCheck } from './finite-check.js';
import { addPromptEmbeds } from './prompt-embeds.js';
import { quantizeActivationsPerRow } from './row-quantize.js';

export interface EngineGraph {
  bytes: Uint8Array;
  sites: SiteLayout[];
  /** Layers whose attention reads past and new K/V without a Concat. */
  splitLayers: number;
  /** Whether the graph takes `prompt_embeds` (prompt tuning's virtual tokens; see prompt-embeds.ts). */
  promptEmbeds: boolean;
  /** Per layer: which KV path applies and why (`inspect` prints it, the server logs the fallbacks). */
  kvPaths: LayerKvPath[];
  /**
   * DynamicQuantizeLinears made per-row (MatMulInteger backbones): a row's codes are then its own only
   * while each prefill run covers its whole prompt, so the engine prefills such rows together only then.
   */
  rowQuantized: number;
}

/**
 * `plan`: the sites on each linear module, in chain order (`planSites`; an empty map builds a graph without sites).
 * `splitAttention: false` keeps the Concat fallback on every layer (the benchmark's comparison).
 */
export function buildEngineGraph(
  backbone: Backbone, plan: ReadonlyMap<string, readonly GraphSite[]>, opts: { splitAttention?: boolean } = {},
): EngineGraph {
  const g = new GraphEditor(backbone.source.model);
  const { splitLayers, layers: kvPaths } = rewriteKvCache(g, backbone.io, { split: opts.splitAttention ?? true });
  rewriteLastLogits(g, backbone.io.vocabSize);
  addLogprobs(g, backbone.io.vocabSize);
  addFiniteCheck(g, backbone.io.vocabSize);
  const sites = insertDeltaSites(g, backbone.linear, plan, backbone.io.float16);
  const { model, modelDir } = backbone.source;
  const opset = Number((model.opsetImport ?? []).find((o) => !o.domain || o.domain === 'ai.onnx')?.version ?? 17);
  const rowQuantized = quantizeActivationsPerRow(g, opset, modelDir);
  const promptEmbeds = addPromptEmbeds(g, backbone.io.vocabSize);
  return { bytes: g.encodeModel(), sites, splitLayers, kvPaths, promptEmbeds, rowQuantized };
}
