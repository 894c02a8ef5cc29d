/** Loads a backbone — an embedded demo or an Optimum export — into what the server needs. */
import { basename, resolve } from 'node:path';
import type { DecoderIO } from './decoder-io.js';
import { demoModelDir } from './demo/materialize.js';
import { demoSpec } from './demo/spec.js';
import { readModelDir, type ModelDir } from './model-dir.js';
import { biasReader, defaultTargetsFor, familyOf, findLinearModules, fingerprintOf, type LinearSite } from './modules.js';
import { loadTokenizer, type BackboneTokenizer } from './tokenizer.js';
import type { BackboneInfo } from './types.js';

export interface Backbone {
  info: BackboneInfo;
  io: DecoderIO;
  source: ModelDir;
  linear: LinearSite[];
  tokenizer: BackboneTokenizer;
}

export interface BackboneOptions {
  /** `demo`, `demo:<family>` or a model directory. */
  model: string;
  cacheDir?: string;
  /** For `demo:gpt2-small`: a real tokenizer.json to use instead of the byte-level one. */
  tokenizerPath?: string;
}

export async function resolveModelDir(opts: BackboneOptions): Promise<{ dir: string; name: string }> {
  const spec = demoSpec(opts.model);
  if (spec) return { dir: await demoModelDir(spec, opts), name: spec.name };
  if (opts.model.startsWith('demo')) {
    throw new Error(`unknown embedded backbone ${opts.model}: use demo, demo:llama, demo:gpt2 or demo:gpt2-small`);
  }
  return { dir: resolve(opts.model), name: '' };
}

export async function loadBackbone(opts: BackboneOptions): Promise<Backbone> {
  const { dir, name } = await resolveModelDir(opts);
  const source = readModelDir(dir);
  const tokenizer = await loadTokenizer(dir);
  const linear = findLinearModules(source.model.graph!);
  const modules = linear.map(({ name, kind, inFeatures, outFeatures, layer, biasInitializer, quantization }) => ({
    name, kind, inFeatures, outFeatures, layer, biasInitializer, ...(quantization ? { quantization } : {}),
  }));
  const cfg = source.config;
  const family = familyOf(typeof cfg.model_type === 'string' ? cfg.model_type : undefined, modules);
  const readBias = biasReader(source.model.graph!, dir);
  const byName = new Map(modules.map((m) => [m.name, m]));
  const num = (...keys: string[]) => keys.map((k) => cfg[k]).find((v): v is number => typeof v === 'number') ?? 0;
  const info: BackboneInfo = {
    name: name || (typeof cfg.name_or_path === 'string' && cfg.name_or_path ? cfg.name_or_path : basename(dir)),
    family,
    fingerprint: fingerprintOf(modules),
    modules,
    defaultTargets: defaultTargetsFor(family),
    hiddenSize: num('hidden_size', 'n_embd'),
    numLayers: source.io.layers,
    kvHeads: source.io.kvHeads,
    headDim: source.io.headDim,
    vocabSize: source.io.vocabSize,
    maxPositions: num('max_position_embeddings', 'n_positions') || 2048,
    biasOf: (module) => readBias(byName.get(module)?.biasInitializer ?? null),
  };
  return { info, io: source.io, source, linear, tokenizer };
}
