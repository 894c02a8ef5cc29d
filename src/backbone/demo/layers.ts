/**
 * Graph pieces shared by the demo families, written the way torch.onnx
 * exports the corresponding PyTorch modules.
 */
import { DataType, GraphBuilder } from '../onnx/graph-builder.js';
import { floatAttr } from '../onnx/proto.js';

/** Lets tests build a model with a delta merged into it, as an independent reference. */
export interface BuildHooks {
  /** Replaces a linear module's weight, given in [in, out] layout. */
  linearWeight?(module: string, w: Float32Array, inFeatures: number, outFeatures: number): Float32Array;
  /** Adds ops on a linear module's output (the MatMul/Gemm result, bias included); `input` is what the MatMul/Gemm read. */
  linearOutput?(g: GraphBuilder, module: string, output: string, outFeatures: number, input: string): string;
}

export interface WeightSource {
  (name: string, n: number, kind: 'linear' | 'bias' | 'embedding' | 'norm_weight' | 'norm_bias'): Float32Array;
}

const scopeOf = (module: string) => '/' + module.split('.').reduce<string[]>((acc, part) => {
  // torch scopes keep `layers.0` together: `/model/layers.0/self_attn/q_proj`.
  if (/^\d+$/.test(part) && acc.length) acc[acc.length - 1] += '.' + part;
  else acc.push(part);
  return acc;
}, []).join('/');

/** Llama-style Linear: a MatMul against the transposed weight, no bias. */
export function linearMatMul(
  g: GraphBuilder, module: string, x: string, inF: number, outF: number, weights: WeightSource, hooks: BuildHooks,
  weightName: string,
): string {
  let w = weights(module + '.weight', inF * outF, 'linear');
  if (hooks.linearWeight) w = hooks.linearWeight(module, w, inF, outF);
  const wName = g.weight(weightName, w, [inF, outF]);
  return g.scope(scopeOf(module), () => {
    const y = g.op('MatMul', [x, wName]);
    return hooks.linearOutput ? hooks.linearOutput(g, module, y, outF, x) : y;
  });
}

/** GPT-2's Conv1D as torch exports it: a Gemm on the 2-D view, then back to [batch, seq, out]. */
export function conv1dGemm(
  g: GraphBuilder, module: string, x: string, inF: number, outF: number, weights: WeightSource, hooks: BuildHooks,
): string {
  let w = weights(module + '.weight', inF * outF, 'linear');
  if (hooks.linearWeight) w = hooks.linearWeight(module, w, inF, outF);
  const wName = g.weight(module + '.weight', w, [inF, outF]);
  const bName = g.weight(module + '.bias', weights(module + '.bias', outF, 'bias'), [outF]);
  return g.scope(scopeOf(module), () => {
    const shape = g.op('Shape', [x]);
    const lead = g.op('Slice', [shape, g.ints([0]), g.ints([2]), g.ints([0])]);
    const outShape = g.op('Concat', [lead, g.ints([outF])], { axis: 0 });
    const x2 = g.op('Reshape', [x, g.ints([-1, inF])]);
    let y = g.op('Gemm', [x2, wName, bName], { alpha: floatAttr('alpha', 1), beta: floatAttr('beta', 1) });
    if (hooks.linearOutput) y = hooks.linearOutput(g, module, y, outF, x2);
    return g.op('Reshape', [y, outShape]);
  });
}

export function layerNorm(g: GraphBuilder, module: string, x: string, dim: number, eps: number, weights: WeightSource): string {
  const w = g.weight(module + '.weight', weights(module + '.weight', dim, 'norm_weight'), [dim]);
  const b = g.weight(module + '.bias', weights(module + '.bias', dim, 'norm_bias'), [dim]);
  return g.scope(scopeOf(module), () =>
    g.op('LayerNormalization', [x, w, b], { axis: -1, epsilon: floatAttr('epsilon', eps) }),
  );
}

export function rmsNorm(g: GraphBuilder, module: string, x: string, dim: number, eps: number, weights: WeightSource): string {
  const w = g.weight(module + '.weight', weights(module + '.weight', dim, 'norm_weight'), [dim]);
  return g.scope(scopeOf(module), () => {
    const sq = g.op('Pow', [x, g.scalar(2)]);
    const mean = g.op('ReduceMean', [sq], { axes: [-1], keepdims: 1 });
    const std = g.op('Sqrt', [g.op('Add', [mean, g.scalar(eps)])]);
    return g.op('Mul', [w, g.op('Div', [x, std])]);
  });
}

/** Optimum's decoder inputs. */
export function decoderInputs(g: GraphBuilder, layers: number, kvHeads: number, headDim: number) {
  const inputIds = g.input('input_ids', DataType.INT64, ['batch_size', 'sequence_length']);
  const attentionMask = g.input('attention_mask', DataType.INT64, ['batch_size', 'past_sequence_length + sequence_length']);
  const positionIds = g.input('position_ids', DataType.INT64, ['batch_size', 'sequence_length']);
  const past: { key: string; value: string }[] = [];
  for (let i = 0; i < layers; i++) {
    past.push({
      key: g.input(`past_key_values.${i}.key`, DataType.FLOAT, ['batch_size', kvHeads, 'past_sequence_length', headDim]),
      value: g.input(`past_key_values.${i}.value`, DataType.FLOAT, ['batch_size', kvHeads, 'past_sequence_length', headDim]),
    });
  }
  return { inputIds, attentionMask, positionIds, past };
}

/**
 * The additive attention bias [batch, 1, seq, past+seq]: a query at position
 * past+i sees keys 0..past+i that the attention mask keeps.
 */
export function attentionBias(g: GraphBuilder, inputIds: string, attentionMask: string): string {
  const seq = g.op('Gather', [g.op('Shape', [inputIds]), g.ints([1], [])], { axis: 0 });
  const total = g.op('Gather', [g.op('Shape', [attentionMask]), g.ints([1], [])], { axis: 0 });
  const past = g.op('Sub', [total, seq]);
  const one = g.ints([1], []);
  const zero = g.ints([0], []);
  const qPos = g.op('Unsqueeze', [g.op('Add', [g.op('Range', [zero, seq, one]), past]), g.ints([1])]);
  const kPos = g.op('Unsqueeze', [g.op('Range', [zero, total, one]), g.ints([0])]);
  const causal = g.op('Unsqueeze', [g.op('LessOrEqual', [kPos, qPos]), g.ints([0, 1])]);
  const keep = g.op('Unsqueeze', [g.op('Cast', [attentionMask], { to: DataType.BOOL }), g.ints([1, 2])]);
  const allowed = g.op('And', [causal, keep]);
  return g.op('Where', [allowed, g.scalar(0), g.scalar(-1e9)]);
}

/**
 * Eager attention over Concat(past, new), the pattern torch exports and the
 * engine's rewrite recognises. Grouped-query attention folds the query groups
 * into the sequence axis instead of repeating K and V.
 * q: [B, heads, S, D]; k, v: [B, kvHeads, S, D]. Returns [B, S, heads*D]; the
 * Concats are the graph's `present` outputs, as in an Optimum export.
 */
export function attention(
  g: GraphBuilder, q: string, k: string, v: string, pastK: string, pastV: string, bias: string,
  heads: number, kvHeads: number, headDim: number, presentNames: { key: string; value: string },
): string {
  const groups = heads / kvHeads;
  const presentK = g.opNamed('Concat', [pastK, k], presentNames.key, { axis: 2 });
  const presentV = g.opNamed('Concat', [pastV, v], presentNames.value, { axis: 2 });
  const qg = groups > 1 ? g.op('Reshape', [q, g.ints([0, kvHeads, -1, headDim])]) : q;
  const kT = g.op('Transpose', [presentK], { perm: [0, 1, 3, 2] });
  let scores = g.op('MatMul', [qg, kT]);
  scores = g.op('Div', [scores, g.scalar(Math.sqrt(headDim))]);
  let probs: string;
  if (groups > 1) {
    const shape4 = g.op('Shape', [scores]);
    const shape5 = g.op('Concat', [
      g.op('Slice', [shape4, g.ints([0]), g.ints([2]), g.ints([0])]),
      g.ints([groups, -1]),
      g.op('Slice', [shape4, g.ints([3]), g.ints([4]), g.ints([0])]),
    ], { axis: 0 });
    const s5 = g.op('Add', [g.op('Reshape', [scores, shape5]), g.op('Unsqueeze', [bias, g.ints([2])])]);
    probs = g.op('Reshape', [g.op('Softmax', [s5], { axis: -1 }), shape4]);
  } else {
    probs = g.op('Softmax', [g.op('Add', [scores, bias])], { axis: -1 });
  }
  let ctx = g.op('MatMul', [probs, presentV]);
  if (groups > 1) ctx = g.op('Reshape', [ctx, g.ints([0, heads, -1, headDim])]);
  return g.op('Reshape', [g.op('Transpose', [ctx], { perm: [0, 2, 1, 3] }), g.ints([0, 0, heads * headDim])]);
}

/** [B, S, heads*D] → [B, heads, S, D] */
export function splitHeads(g: GraphBuilder, x: string, heads: number, headDim: number): string {
  return g.op('Transpose', [g.op('Reshape', [x, g.ints([0, 0, heads, headDim])])], { perm: [0, 2, 1, 3] });
}
