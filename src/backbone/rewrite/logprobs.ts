/**
 * Log-probabilities in the graph, beside the last position's logits: the
 * top-k tokens' log-probabilities and ids, and log Σ exp(logits), with which
 * any one token's log-probability is its logit minus that. A step where some
 * row asks for logprobs fetches these few numbers per row, not the
 * [batch, vocab] logits.
 *
 * They sit behind an If on the `logprobs_on` input: ORT runs every node of a
 * graph whatever outputs are fetched, and the Exp over [batch, vocab] would
 * cost every greedy step a few percent. A step that asks nothing feeds false
 * and runs the empty branch. (An input with a default, i.e. an overridable
 * initializer, would spare callers the feed, but onnxruntime-node drops feeds
 * it does not list as inputs.)
 *
 * The sum runs as a MatMul against a column of ones rather than ReduceSum, whose
 * signature changed at opset 13 (axes became an input): the rewrite works on
 * whatever opset the exporter wrote.
 */
import { DataType } from '../onnx/graph-builder.js';
import { onnx, valueInfo } from '../onnx/proto.js';
import type { GraphEditor } from './editor.js';

/** Scalar bool input: true computes the outputs below, false leaves them empty ([0, k], [0]). */
export const LOGPROBS_ON = 'logprobs_on';
/** [batch, k] float: the k best tokens' log-probabilities, best first (ties: lower id first, as ArgMax). */
export const TOP_LOGPROBS = 'top_logprobs';
/** [batch, k] int64: their ids. */
export const TOP_LOGPROB_IDS = 'top_logprob_ids';
/** [batch] float: log Σ exp(logits), so a token's log-probability is its logit minus this. */
export const LOGSUMEXP = 'logsumexp';
/** The most alternatives a token can come with (OpenAI's completions limit, TGI's default top_n_tokens limit). */
export const MAX_TOP_LOGPROBS = 5;

const GRAPH_ATTR = onnx.AttributeProto.AttributeType.GRAPH;
const OUTPUTS = [TOP_LOGPROBS, TOP_LOGPROB_IDS, LOGSUMEXP];
const TYPES = [DataType.FLOAT, DataType.INT64, DataType.FLOAT];

export function addLogprobs(g: GraphEditor, vocabSize: number): void {
  const k = Math.min(MAX_TOP_LOGPROBS, vocabSize);
  g.input(LOGPROBS_ON, DataType.BOOL, []);
  g.scope('/deltaserve/logprobs', () => {
    const on = g.subgraph('logprobs_on', '/deltaserve/logprobs', (sub) => {
      const [top, ids] = sub.nodeN('TopK', ['logits', sub.ints([k])], 2, { axis: -1, largest: 1, sorted: 1 });
      const max = sub.op('Slice', [top, sub.ints([0]), sub.ints([1]), sub.ints([1])]);
      const ones = sub.floats(new Array<number>(vocabSize).fill(1), [vocabSize, 1]);
      const sum = sub.op('MatMul', [sub.op('Exp', [sub.op('Sub', ['logits', max])]), ones]);
      const lse = sub.op('Add', [sub.op('Log', [sum]), max]);
      return [sub.op('Sub', [top, lse]), sub.op('Identity', [ids]), sub.op('Reshape', [lse, sub.ints([-1])])];
    }, TYPES);
    const off = g.subgraph('logprobs_off', '/deltaserve/logprobs/off', (sub) => [
      sub.op('Identity', [sub.floats([], [0, k])]),
      sub.op('Identity', [sub.ints([], [0, k])]),
      sub.op('Identity', [sub.floats([], [0])]),
    ], TYPES);
    const branch = (name: string, graph: typeof on) => ({ name, type: GRAPH_ATTR, g: graph });
    const outs = g.nodeN('If', [LOGPROBS_ON], OUTPUTS.length, { then_branch: branch('then_branch', on), else_branch: branch('else_branch', off) });
    OUTPUTS.forEach((name, i) => g.opNamed('Identity', [outs[i]], name));
  });
  g.outputs.push(valueInfo(TOP_LOGPROBS, DataType.FLOAT, ['batch_size', k]));
  g.outputs.push(valueInfo(TOP_LOGPROB_IDS, DataType.INT64, ['batch_size', k]));
  g.outputs.push(valueInfo(LOGSUMEXP, DataType.FLOAT, ['batch_size']));
}
