/** Activation functions as exporters write them, so ORT's fusions recognise them. */
import type { GraphBuilder } from './graph-builder.js';

/** GPT-2's gelu_new: the tanh approximation. */
export function geluNew(g: GraphBuilder, x: string): string {
  const cube = g.op('Pow', [x, g.scalar(3)]);
  const inner = g.op('Add', [x, g.op('Mul', [cube, g.scalar(0.044715)])]);
  const t = g.op('Tanh', [g.op('Mul', [inner, g.scalar(Math.sqrt(2 / Math.PI))])]);
  return g.op('Mul', [g.op('Mul', [x, g.scalar(0.5)]), g.op('Add', [t, g.scalar(1)])]);
}

export function silu(g: GraphBuilder, x: string): string {
  return g.op('Mul', [x, g.op('Sigmoid', [x])]);
}

/** Exact gelu, written x·(1+erf(x/√2))·0.5: the form ORT's Gelu fusion matches whole. */
export function geluErf(g: GraphBuilder, x: string): string {
  const erf = g.op('Erf', [g.op('Div', [x, g.scalar(Math.SQRT2)])]);
  return g.op('Mul', [g.op('Mul', [x, g.op('Add', [erf, g.scalar(1)])]), g.scalar(0.5)]);
}
