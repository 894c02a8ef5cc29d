/**
 * The KV cache never round-trips through JavaScript: the graph returns only
 * the step's new K/V (`new.N.key/value`), and the engine keeps the cache in
 * buffers it owns and feeds back as `past`. Where attention reads the
 * Concat(past, new) the way eager exports write it, the Concat is removed:
 * scores and context are computed over past and new separately, so no step
 * copies the whole cache.
 */
import { DataType } from '../onnx/graph-builder.js';
import { attrInt, attrInts, valueInfo, type NodeProto } from '../onnx/proto.js';
import type { DecoderIO } from '../decoder-io.js';
import type { GraphEditor } from './editor.js';

export const newKvName = (layer: number, kv: 'key' | 'value') => `new.${layer}.${kv}`;

export interface KvRewriteReport {
  /** Layers whose attention now reads past and new separately (no Concat). */
  splitLayers: number;
}

const isLastTwoSwap = (perm: number[] | undefined) =>
  !!perm && perm.length === 4 && perm[0] === 0 && perm[1] === 1 && perm[2] === 3 && perm[3] === 2;

export function rewriteKvCache(g: GraphEditor, io: DecoderIO): KvRewriteReport {
  let splitLayers = 0;
  for (let layer = 0; layer < io.layers; layer++) {
    const idx = g.index();
    const concat: Record<'key' | 'value', NodeProto> = {} as never;
    for (const kv of ['key', 'value'] as const) {
      const present = `present.${layer}.${kv}`;
      const node = idx.producer.get(present);
      const axis = node ? attrInt(node, 'axis') : undefined;
      if (!node || node.opType !== 'Concat' || node.input?.length !== 2 || (axis !== 2 && axis !== -2)) {
        throw new Error(`${present} is not Concat(past, new) on the sequence axis; this export's KV cache layout is not supported`);
      }
      concat[kv] = node;
      g.removeOutput(present);
      g.opNamed('Identity', [node.input![1]], newKvName(layer, kv));
      g.outputs.push(valueInfo(newKvName(layer, kv), DataType.FLOAT, ['batch_size', io.kvHeads, 'sequence_length', io.headDim]));
    }
    if (splitAttention(g, concat.key, concat.value)) splitLayers++;
  }
  return { splitLayers };
}

/**
 * scores = q · [past; new]ᵀ  →  Concat(q · pastᵀ, q · newᵀ)
 * ctx    = p · [past; new]   →  p[..., :P] · past + p[..., P:] · new
 * Applied only when every reader of both Concats has one of these forms.
 */
function splitAttention(g: GraphEditor, keyConcat: NodeProto, valueConcat: NodeProto): boolean {
  const idx = g.index();
  const kOut = keyConcat.output![0];
  const vOut = valueConcat.output![0];
  const keyReaders = idx.consumersOf(kOut);
  const valueReaders = idx.consumersOf(vOut);
  const scoreMatMuls: { transpose: NodeProto; matmul: NodeProto }[] = [];
  for (const t of keyReaders) {
    if (t.opType !== 'Transpose' || !isLastTwoSwap(attrInts(t, 'perm'))) return false;
    for (const m of idx.consumersOf(t.output![0])) {
      if (m.opType !== 'MatMul' || m.input![1] !== t.output![0]) return false;
      scoreMatMuls.push({ transpose: t, matmul: m });
    }
  }
  if (!scoreMatMuls.length || !valueReaders.length) return false;
  if (valueReaders.some((m) => m.opType !== 'MatMul' || m.input![1] !== vOut)) return false;

  const [pastK, newK] = keyConcat.input!;
  const [pastV, newV] = valueConcat.input!;
  const dead = new Set<NodeProto>();
  g.scope('/deltaserve/attention', () => {
    const perm = { perm: [0, 1, 3, 2] };
    const pastKT = g.op('Transpose', [pastK], perm);
    const newKT = g.op('Transpose', [newK], perm);
    for (const { matmul } of scoreMatMuls) {
      const q = matmul.input![0];
      g.opNamed('Concat', [g.op('MatMul', [q, pastKT]), g.op('MatMul', [q, newKT])], matmul.output![0], { axis: -1 });
      dead.add(matmul);
    }
    const pastLen = g.op('Slice', [g.op('Shape', [pastV]), g.ints([2]), g.ints([3]), g.ints([0])]);
    for (const m of valueReaders) {
      const probs = m.input![0];
      const pPast = g.op('Slice', [probs, g.ints([0]), pastLen, g.ints([-1])]);
      const pNew = g.op('Slice', [probs, pastLen, g.ints([Number.MAX_SAFE_INTEGER]), g.ints([-1])]);
      g.opNamed('Add', [g.op('MatMul', [pPast, pastV]), g.op('MatMul', [pNew, newV])], m.output![0]);
      dead.add(m);
    }
  });
  g.removeNodes(dead);
  return true;
}
