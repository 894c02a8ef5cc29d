/**
 * Only the last position's logits leave the graph: the hidden state is sliced
 * before lm_head, so a prefill of S tokens pays for one row of the vocabulary
 * projection instead of S, and returns [batch, vocab] instead of [batch, S, vocab].
 * It also returns the argmax, so an all-greedy step fetches [batch] ids only.
 */
import { DataType } from '../onnx/graph-builder.js';
import { attrInt, dimsOf, valueInfo, type NodeProto } from '../onnx/proto.js';
import type { GraphEditor } from './editor.js';

/**
 * Ops between lm_head and `logits` that keep every value: views, and Cast (Llama's `logits.float()`;
 * a float16 export's upcast). The rewrite recomputes logits from the last position and casts to float itself.
 */
const VALUE_PRESERVING = new Set(['Reshape', 'Flatten', 'Squeeze', 'Unsqueeze', 'Identity', 'Cast']);

export const GREEDY_TOKEN = 'greedy_token';

export function rewriteLastLogits(g: GraphEditor, vocabSize: number): void {
  const idx = g.index();
  // Walk back from `logits` through views to the vocabulary projection.
  let node: NodeProto | undefined = idx.producer.get('logits');
  const walked: string[] = [];
  while (node && VALUE_PRESERVING.has(node.opType!)) {
    walked.push(`${node.opType} ${node.name}`);
    node = idx.producer.get(node.input![0]);
  }
  if (!node || (node.opType !== 'MatMul' && node.opType !== 'Gemm')) {
    const at = node ? `${node.opType} node ${node.name}` : 'a graph input or initializer';
    throw new Error(
      `cannot find the lm_head MatMul/Gemm that produces logits: walking back from logits` +
      `${walked.length ? ` through ${walked.join(' ← ')}` : ''} reached ${at}; expected a MatMul or Gemm ` +
      `with a weight initializer, reached only through ${[...VALUE_PRESERVING].join('/')}`,
    );
  }
  const weight = idx.initializers.get(node.input![1]);
  if (!weight) throw new Error(`lm_head ${node.name} has no weight initializer`);
  const transB = node.opType === 'Gemm' && attrInt(node, 'transB') === 1;
  const hidden = transB ? dimsOf(weight)[1] : dimsOf(weight)[0];
  // The 3-D hidden state [batch, seq, hidden], before any 2-D view for a Gemm.
  let h = node.input![0];
  const viewNode = idx.producer.get(h);
  if (viewNode && (viewNode.opType === 'Reshape' || viewNode.opType === 'Flatten')) h = viewNode.input![0];

  g.removeOutput('logits');
  g.scope('/deltaserve/lm_head', () => {
    const last = g.op('Slice', [h, g.ints([-1]), g.ints([Number.MAX_SAFE_INTEGER]), g.ints([1])]);
    const x2 = g.op('Reshape', [last, g.ints([-1, hidden])]);
    const extra = node.opType === 'Gemm' ? (node.input!.slice(2)) : [];
    const attrs = Object.fromEntries((node.attribute ?? []).map((a) => [a.name!, a]));
    const gemmAttrs = node.opType === 'Gemm' ? attrs : {};
    // A float16 lm_head's logits are upcast here, whether or not the export had its own Cast.
    if (weight.dataType === DataType.FLOAT) g.opNamed(node.opType!, [x2, node.input![1], ...extra], 'logits', gemmAttrs);
    else g.opNamed('Cast', [g.op(node.opType!, [x2, node.input![1], ...extra], gemmAttrs)], 'logits', { to: DataType.FLOAT });
  });
  g.outputs.push(valueInfo('logits', DataType.FLOAT, ['batch_size', vocabSize]));
  // A step whose rows are all greedy fetches only this: [batch] ids instead of [batch, vocab] floats.
  g.scope('/deltaserve/lm_head', () => g.opNamed('ArgMax', ['logits'], GREEDY_TOKEN, { axis: -1, keepdims: 0 }));
  g.outputs.push(valueInfo(GREEDY_TOKEN, DataType.INT64, ['batch_size']));
  // The old logits chain is now unread; pruneDead() removes it.
  const old = idx.producer.get('logits')!;
  old.output = old.output!.map((o) => (o === 'logits' ? `${o}/unused` : o));
}
