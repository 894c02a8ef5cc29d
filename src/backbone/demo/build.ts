/** Builds a demo backbone's graph with its deterministic weights. */
import type { GraphBuilder } from '../onnx/graph-builder.js';
import { buildGpt2 } from './gpt2.js';
import { buildLlama } from './llama.js';
import type { BuildHooks, WeightSource } from './layers.js';
import type { DemoSpec } from './spec.js';
import { normal } from './weights.js';

export function demoWeights(spec: DemoSpec): WeightSource {
  return (name, n, kind) => {
    switch (kind) {
      case 'linear':
        // Scaled so activations keep unit size through the stack and logits are far from ties.
        return normal(spec.seed, name, n, 1 / Math.sqrt(spec.hidden));
      case 'embedding':
        return normal(spec.seed, name, n, 0.5);
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

