/** Builds a demo backbone's graph with its deterministic weights. */
import type { GraphBuilder } from '../onnx/graph-builder.js';
import { buildGpt2 } from './gpt2.js';
import { buildLlama } from './llama.js';
import type { BuildHooks, WeightSource } from './layers.js';
import type { DemoSpec } from './spec.js';
import { normal } from './weights.js';

/**
 * Random weights speak random bytes. Scaling the output embedding of printable
 * ASCII up and of placeholder tokens down makes the demo print readable
 * (still meaningless) text, which is kinder to someone trying curl.
 */
function favourPrintable(spec: DemoSpec, name: string, w: Float32Array): Float32Array {
  const V = spec.vocabSize;
  const H = spec.hidden;
  const scale = (id: number) => (id >= 32 && id < 127 ? 2.5 : id >= 256 + 3 ? 0.3 : 1);
  if (name === 'lm_head.weight') {
    for (let h = 0; h < H; h++) for (let v = 0; v < V; v++) w[h * V + v] *= scale(v);
  } else if (name === 'transformer.wte.weight') {
    for (let v = 0; v < V; v++) {
      const k = scale(v);
      if (k !== 1) for (let h = 0; h < H; h++) w[v * H + h] *= k;
    }
  }
  return w;
}

export function demoWeights(spec: DemoSpec): WeightSource {
  const base = baseWeights(spec);
  return (name, n, kind) => favourPrintable(spec, name, base(name, n, kind));
}

function baseWeights(spec: DemoSpec): WeightSource {
  return (name, n, kind) => {
    switch (kind) {
      case 'linear':
        // Scaled so activations keep unit size through the stack and logits are far from ties.
        return normal(spec.seed, name, n, 1 / Math.sqrt(spec.hidden));
      case 'embedding':
        // GPT-2 ties lm_head to wte: a large wte makes every token predict itself.
        return normal(spec.seed, name, n, spec.family === 'gpt2' ? 0.02 : 0.5);
      case 'bias':
      case 'norm_bias':
        return normal(spec.seed, name, n, 0.02);
      case 'norm_weight':
        return normal(spec.seed, name, n, 0.1, 1);
    }
  };
}

export function buildDemoGraph(spec: DemoSpec, hooks: BuildHooks = {}, weights: WeightSource = demoWeights(spec)): GraphBuilder {
  return spec.family === 'llama' ? buildLlama(spec, weights, hooks) : buildGpt2(spec, weights, hooks);
}

