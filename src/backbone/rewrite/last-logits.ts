/**
 * Only the last position's logits leave the graph: the hidden state is sliced
 * before lm_head, so a prefill of S tokens pays for one row of the vocabulary
 * projection instead of S, and returns [batch, vocab] instead of [batch, S, vocab].
 * It also returns the argmax, so an all-greedy step fetches [batch] ids only.
 */
import { DataType } from '../onnx/graph-builder.js';
import { attrInt, dimsOf, valueInfo, type NodeProto } from '../onnx/proto.js';
import type { GraphIndex } from '../onnx/graph-index.js';
import type { GraphEditor } from './editor.js';

/**
 * Ops between lm_head and `logits` that keep every value: views, and Cast (Llama's `logits.float()`;
 * a float16 export's upcast). The rewrite recomputes logits from the last position and casts to float itself.
 */
const VALUE_PRESERVING = new Set(['Reshape', 'Flatten', 'Squeeze', 'Unsqueeze', 'Identity', 'Cast']);

export const GREEDY_TOKEN = 'greedy_token';

/** The vocabulary projections the rewrite knows: float, or quantized by `deltaserve quantize` (and quantize_dynamic's MatMulInteger chain, below). */
const LM_HEAD_OPS = ['MatMul', 'Gemm', 'MatMulNBits'];

/** The 3-D hidden state [batch, seq, hidden] under a 2-D view for a Gemm, or the tensor itself. */
function hiddenOf(idx: GraphIndex, t: string): string {
  const viewNode = idx.producer.get(t);
  return viewNode && (viewNode.opType === 'Reshape' || viewNode.opType === 'Flatten') ? viewNode.input![0] : t;
}

function rewriteFloatLmHead(g: GraphEditor, idx: GraphIndex, node: NodeProto): void {
  const weight = idx.initializers.get(node.input![1]);
  if (!weight) throw new Error(`lm_head ${node.name} has no weight initializer`);
  const transB = node.opType === 'Gemm' && attrInt(node, 'transB') === 1;
  // A quantized lm_head (MatMulNBits) says its input width in K.
  const hidden = node.opType === 'MatMulNBits' ? attrInt(node, 'K')! : transB ? dimsOf(weight)[1] : dimsOf(weight)[0];
  const h = hiddenOf(idx, node.input![0]);

  g.scope('/deltaserve/lm_head', () => {
    const last = g.op('Slice', [h, g.ints([-1]), g.ints([Number.MAX_SAFE_INTEGER]), g.ints([1])]);
    const x2 = g.op('Reshape', [last, g.ints([-1, hidden])]);
    // Gemm's bias and MatMulNBits' scales and zero points come along, with the op's attributes and domain.
    const extra = node.opType === 'MatMul' ? [] : node.input!.slice(2);
    const attrs = Object.fromEntries((node.attribute ?? []).map((a) => [a.name!, a]));
    const opAttrs = node.opType === 'MatMul' ? {} : attrs;
    // MatMulNBits computes in its scales' type; the others in their weight's.
    const computes = node.opType === 'MatMulNBits' ? idx.initializers.get(node.input![2])?.dataType : weight.dataType;
    const inputs = [x2, node.input![1], ...extra];
    // A float16 lm_head's logits are upcast here, whether or not the export had its own Cast.
    if (computes === DataType.FLOAT) g.opNamed(node.opType!, inputs, 'logits', opAttrs);
    else g.opNamed('Cast', [g.op(node.opType!, inputs, opAttrs)], 'logits', { to: DataType.FLOAT });
    // A contrib op (MatMulNBits) keeps its domain.
    if (node.domain) for (const n of g.nodes) if (n.opType === node.opType && n.name?.startsWith('/deltaserve/lm_head')) n.domain = node.domain;
  });
}

interface IntegerLmHead {
  quantize: NodeProto;
  matmul: NodeProto;
  scalesMul: NodeProto;
}

/** lm_head as quantize_dynamic writes it: the output Mul ← Cast ← MatMulInteger ← DynamicQuantizeLinear, and the scales' Mul. */
function integerChain(mul: NodeProto, idx: GraphIndex): IntegerLmHead | null {
  for (const [i, t] of (mul.input ?? []).entries()) {
    const cast = idx.producer.get(t);
    const matmul = cast?.opType === 'Cast' ? idx.producer.get(cast.input![0]) : undefined;
    const quantize = matmul?.opType === 'MatMulInteger' ? idx.producer.get(matmul.input![0]) : undefined;
    const scalesMul = idx.producer.get(mul.input![1 - i]);
    if (quantize?.opType === 'DynamicQuantizeLinear' && scalesMul?.opType === 'Mul' && idx.initializers.has(matmul!.input![1])) {
      return { quantize, matmul: matmul!, scalesMul };
    }
  }
  return null;
}

/**
 * The activations are quantized over every position, as the original graph
 * does (its DynamicQuantizeLinear then becomes a per-row one: row-quantize.ts),
 * and only the last position's codes are multiplied: the logits are the
 * original's, row for row.
 */
function rewriteIntegerLmHead(g: GraphEditor, lm: IntegerLmHead): void {
  const idx = g.index();
  const h = hiddenOf(idx, lm.quantize.input![0]);
  const hidden = dimsOf(idx.initializers.get(lm.matmul.input![1])!)[0];
  const wScale = lm.scalesMul.input!.find((i) => i !== lm.quantize.output![1])!;
  g.scope('/deltaserve/lm_head', () => {
    const [q, scale, zeroPoint] = g.nodeN('DynamicQuantizeLinear', [h], 3);
    const last = g.op('Slice', [q, g.ints([-1]), g.ints([Number.MAX_SAFE_INTEGER]), g.ints([1])]);
    const x2 = g.op('Reshape', [last, g.ints([-1, hidden])]);
    const product = g.op('MatMulInteger', [x2, lm.matmul.input![1], zeroPoint, lm.matmul.input![3]].filter((i) => i !== undefined));
    g.opNamed('Mul', [g.op('Cast', [product], { to: DataType.FLOAT }), g.op('Mul', [scale, wScale])], 'logits');
  });
}

export function rewriteLastLogits(g: GraphEditor, vocabSize: number): void {
  const idx = g.index();
  // Walk back from `logits` through views to the vocabulary projection.
  let node: NodeProto | undefined = idx.producer.get('logits');
  const walked: string[] = [];
  while (node && VALUE_PRESERVING.has(node.opType!)) {
    walked.push(`${node.opType} ${node.name}`);
    node = idx.producer.get(node.input![0]);
  }
  const integer = node?.opType === 'Mul' ? integerChain(node, idx) : null;
  if (!node || (!LM_HEAD_OPS.includes(node.opType!) && !integer)) {
    const at = node ? `${node.opType} node ${node.name}` : 'a graph input or initializer';
    throw new Error(
      `cannot find the lm_head ${LM_HEAD_OPS.join('/')} that produces logits: walking back from logits` +
      `${walked.length ? ` through ${walked.join(' ← ')}` : ''} reached ${at}; expected a ${LM_HEAD_OPS.join(', ')} ` +
      `with a weight initializer (or a MatMulInteger behind DynamicQuantizeLinear), reached only through ${[...VALUE_PRESERVING].join('/')}`,
    );
  }
  g.removeOutput('logits');
  if (integer) {
    rewriteIntegerLmHead(g, integer);
  } else {
    rewriteFloatLmHead(g, idx, node);
  }
  g.outputs.push(valueInfo('logits', DataType.FLOAT, ['batch_size', vocabSize]));
  // A step whose rows are all greedy fetches only this: [batch] ids instead of [batch, vocab] floats.
  g.scope('/deltaserve/lm_head', () => g.opNamed('ArgMax', ['logits'], GREEDY_TOKEN, { axis: -1, keepdims: 0 }));
  g.outputs.push(valueInfo(GREEDY_TOKEN, DataType.INT64, ['batch_size']));
  // The old logits chain is now unread; pruneDead() removes it.
  const old = idx.producer.get('logits')!;
  old.output = old.output!.map((o) => (o === 'logits' ? `${o}/unused` : o));
}
