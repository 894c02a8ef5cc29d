/** The embedded demo backbones: shapes and seeds, nothing else. */
export type DemoFamily = 'llama' | 'gpt2';

export interface DemoSpec {
  name: string;
  family: DemoFamily;
  vocabSize: number;
  hidden: number;
  layers: number;
  heads: number;
  kvHeads: number;
  intermediate: number;
  maxPositions: number;
  seed: number;
  eps: number;
  ropeTheta: number;
}

export const DEMO_SPECS: Record<string, DemoSpec> = {
  'demo:llama': {
    name: 'demo:llama', family: 'llama', vocabSize: 384, hidden: 128, layers: 4, heads: 4, kvHeads: 2,
    intermediate: 352, maxPositions: 1024, seed: 1, eps: 1e-5, ropeTheta: 10000,
  },
  'demo:gpt2': {
    name: 'demo:gpt2', family: 'gpt2', vocabSize: 384, hidden: 128, layers: 4, heads: 4, kvHeads: 4,
    intermediate: 512, maxPositions: 1024, seed: 2, eps: 1e-5, ropeTheta: 0,
  },
  /** GPT-2 small's exact shapes, so real GPT-2 PEFT adapters fit and benchmarks mean something. */
  'demo:gpt2-small': {
    name: 'demo:gpt2-small', family: 'gpt2', vocabSize: 50257, hidden: 768, layers: 12, heads: 12, kvHeads: 12,
    intermediate: 3072, maxPositions: 1024, seed: 3, eps: 1e-5, ropeTheta: 0,
  },
};

export function demoSpec(model: string): DemoSpec | null {
  const name = model === 'demo' ? 'demo:llama' : model;
  return DEMO_SPECS[name] ?? null;
}

export const headDim = (s: DemoSpec) => s.hidden / s.heads;
