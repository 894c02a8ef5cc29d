/**
 * A per-row check that the logits are finite, beside them in the graph. A
 * delta whose finite weights overflow float32 in the forward pass (3e38 is a
 * legal float) yields Inf/NaN logits; ArgMax over them returns a meaningless
 * id (token 0 for ever), so the engine must know, row by row, without
 * fetching [batch, vocab] floats on greedy steps.
 *
 * logits × 0 is 0 for a finite logit and NaN for ±Inf or NaN; summed over the
 * vocabulary (a MatMul against ones, which every opset has the same way) a row
 * is NaN exactly when one of its logits was not finite.
 */
import { DataType } from '../onnx/graph-builder.js';
import { valueInfo } from '../onnx/proto.js';
import type { GraphEditor } from './editor.js';

/** [batch] float: NaN where the row's logits hold a NaN or ±Inf, 0 otherwise. */
export const LOGITS_NONFINITE = 'logits_nonfinite';

export function addFiniteCheck(g: GraphEditor, vocabSize: number): void {
  g.scope('/deltaserve/finite', () => {
    const zeroed = g.op('Mul', ['logits', g.floats([0], [])]);
    const sum = g.op('MatMul', [zeroed, g.floats(new Array<number>(vocabSize).fill(1), [vocabSize, 1])]);
    g.opNamed('Reshape', [sum, g.ints([-1])], LOGITS_NONFINITE);
  });
  g.outputs.push(valueInfo(LOGITS_NONFINITE, DataType.FLOAT, ['batch_size']));
}
