/** BackboneInfo values shaped like real models, built by hand so the tests do not depend on src/backbone. */
import { createHash } from 'node:crypto';
import type { BackboneInfo, LinearModule } from '../../src/backbone/types.js';

function info(name: string, family: string, hidden: number, layers: number, modules: LinearModule[], withBias: boolean): BackboneInfo {
  const fingerprint = createHash('sha256')
    .update(modules.map((m) => `${m.name}:${m.inFeatures}x${m.outFeatures}`).join('\n'))
    .digest('hex');
  return {
    name,
    family,
    fingerprint,
    modules,
    defaultTargets: {},
    hiddenSize: hidden,
    numLayers: layers,
    vocabSize: 50257,
    maxPositions: 1024,
    biasOf: (module) => {
      const m = modules.find((x) => x.name === module);
      return m && withBias ? backboneBias(module, m.outFeatures) : null;
    },
  };
}

/** The bias a test backbone has for a module: deterministic, so tests can recompute it. */
export function backboneBias(module: string, n: number): Float32Array {
  const out = new Float32Array(n);
  let h = 0;
  for (const c of module) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  for (let i = 0; i < n; i++) out[i] = (((h + i * 2654435761) >>> 0) % 1000) / 1000 - 0.5;
  return out;
}

/** One layer's linear modules under `prefix`, each [name, in, out], with or without a bias. */
function layerModules(prefix: string, layer: number, shapes: [string, number, number][], bias: boolean): LinearModule[] {
  return shapes.map(([n, inFeatures, outFeatures]) => ({
    name: `${prefix}.${n}`, kind: 'linear', inFeatures, outFeatures, layer, biasInitializer: bias ? `${prefix}.${n}.bias` : null,
  }));
}

/** GPT-2's linear modules (Conv1D, as PEFT names them) for any width and depth. */
export function gpt2Like(layers: number, hidden: number, name = 'gpt2-test'): BackboneInfo {
  const modules = Array.from({ length: layers }, (_, l) => layerModules(`transformer.h.${l}`, l, [
    ['attn.c_attn', hidden, 3 * hidden],
    ['attn.c_proj', hidden, hidden],
    ['mlp.c_fc', hidden, 4 * hidden],
    ['mlp.c_proj', 4 * hidden, hidden],
  ], true)).flat();
  return info(name, 'gpt2', hidden, layers, modules, true);
}

/** GPT-2 small: 12 layers of width 768 (the shapes `demo:gpt2-small` has). */
export const gpt2Small = () => gpt2Like(12, 768, 'gpt2-small');

/** Llama's linear modules (no biases). */
export function llamaLike(layers: number, hidden: number, inter: number, name = 'llama-test'): BackboneInfo {
  const modules = Array.from({ length: layers }, (_, l) => layerModules(`model.layers.${l}`, l, [
    ['self_attn.q_proj', hidden, hidden],
    ['self_attn.k_proj', hidden, hidden],
    ['self_attn.v_proj', hidden, hidden],
    ['self_attn.o_proj', hidden, hidden],
    ['mlp.gate_proj', hidden, inter],
    ['mlp.up_proj', hidden, inter],
    ['mlp.down_proj', inter, hidden],
  ], false)).flat();
  return info(name, 'llama', hidden, layers, modules, false);
}
