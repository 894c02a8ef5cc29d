/**
 * The KV cache never round-trips through JavaScript: the graph returns only
 * the step's new K/V (`new.N.key/value`), and the engine keeps the cache in
 * buffers it owns and feeds back as `past`. Where attention reads the
 * Concat(past, new) the way eager exports write it, the Concat is removed:
 * scores and context are computed over past and new separately, so no step
 * copies the whole cache.
 *
 * Real torch exports read the Concat in three more ways, all handled: `Shape`
 * nodes (`key.size(-2)`, `value.size(-1)`, repeat_kv's `hidden_states.shape`),
 * which get the shape computed from past and new instead; and, for
 * grouped-query attention, Llama's `repeat_kv` chain
 * (Unsqueeze(axis 2) → Expand → Reshape), which is applied to past and new
 * separately. Anything else keeps its Concat (still exact, one O(context) copy
 * per layer per step), and the report says which reader stopped the split.
 */
import { DataType } from '../onnx/graph-builder.js';
import { attrInt, attrInts, valueInfo, type NodeProto, type TensorProto } from '../onnx/proto.js';
import type { GraphIndex } from '../onnx/graph-index.js';
import type { DecoderIO } from '../decoder-io.js';
import type { GraphEditor } from './editor.js';

export const newKvName = (layer: number, kv: 'key' | 'value') => `new.${layer}.${kv}`;

/** How one layer's attention reads its cache after the rewrite, and why. */
export interface LayerKvPath {
  layer: number;
  /** `split`: past and new read separately, no Concat; `concat`: the fallback, Concat(past, new) kept. */
  path: 'split' | 'concat';
  reason: string;
}

export interface KvRewriteReport {
  /** Layers whose attention now reads past and new separately (no Concat). */
  splitLayers: number;
  layers: LayerKvPath[];
}

const isLastTwoSwap = (perm: number[] | undefined) =>
  !!perm && perm.length === 4 && perm[0] === 0 && perm[1] === 1 && perm[2] === 3 && perm[3] === 2;

/**
 * A float16 export's past inputs become float32 inputs cast to float16 inside the graph (and its
 * new K/V are cast back), so the engine's cache buffers and feeds stay float32 for every model.
 */
function float32Past(g: GraphEditor, io: DecoderIO): void {
  for (let layer = 0; layer < io.layers; layer++) {
    for (const kv of ['key', 'value'] as const) {
      const past = `past_key_values.${layer}.${kv}`;
      const half = `${past}/float16`;
      for (const n of g.nodes) n.input = (n.input ?? []).map((i) => (i === past ? half : i));
      g.scope('/deltaserve/float16', () => g.opNamed('Cast', [past], half, { to: DataType.FLOAT16 }));
      const i = g.inputs.findIndex((v) => v.name === past);
      g.inputs[i] = valueInfo(past, DataType.FLOAT, ['batch_size', io.kvHeads, 'past_sequence_length', io.headDim]);
    }
  }
}

/** `split: false` keeps every Concat (the fallback path, for comparing against it). */
export function rewriteKvCache(g: GraphEditor, io: DecoderIO, { split = true } = {}): KvRewriteReport {
  if (io.float16) float32Past(g, io);
  const layers: LayerKvPath[] = [];
  for (let layer = 0; layer < io.layers; layer++) {
    const idx = g.index();
    const concat: Record<'key' | 'value', NodeProto> = {} as never;
    for (const kv of ['key', 'value'] as const) {
      const present = `present.${layer}.${kv}`;
      const node = idx.producer.get(present);
      const axis = node ? attrInt(node, 'axis') : undefined;
      if (!node || node.opType !== 'Concat' || node.input?.length !== 2 || (axis !== 2 && axis !== -2)) {
        const found = node ? `${node.opType} node ${node.name}${node.opType === 'Concat' ? ` on axis ${axis}` : ''}` : 'no node';
        throw new Error(`${present} is produced by ${found}; expected Concat(past, new) on the sequence axis (2): this export's KV cache layout is not supported`);
      }
      concat[kv] = node;
      g.removeOutput(present);
      if (io.float16) g.opNamed('Cast', [node.input![1]], newKvName(layer, kv), { to: DataType.FLOAT });
      else g.opNamed('Identity', [node.input![1]], newKvName(layer, kv));
      g.outputs.push(valueInfo(newKvName(layer, kv), DataType.FLOAT, ['batch_size', io.kvHeads, 'sequence_length', io.headDim]));
    }
    const why = split ? splitAttention(g, concat.key, concat.value) : 'split attention turned off';
    layers.push(typeof why === 'string'
      ? { layer, path: 'concat', reason: why }
      : { layer, path: 'split', reason: why.join('; ') });
  }
  return { splitLayers: layers.filter((l) => l.path === 'split').length, layers };
}

/** A read of the Concat's value, possibly through the repeat_kv chain: `out` is what attention reads. */
interface Branch {
  /** [] for a direct read; [Unsqueeze, Expand, Reshape] for repeat_kv. */
  chain: NodeProto[];
  out: string;
}

interface Readers {
  shapes: NodeProto[];
  branches: Branch[];
}

/** int64 values of a Constant node's output or an initializer, if it is one. */
function constInts(idx: GraphIndex, name: string): number[] | null {
  const t: TensorProto | undefined = idx.initializers.get(name)
    ?? idx.producer.get(name)?.attribute?.find((a) => a.name === 'value')?.t ?? undefined;
  if (!t || t.dataType !== DataType.INT64) return null;
  if (t.rawData?.length) {
    const raw = Uint8Array.prototype.slice.call(t.rawData);
    return [...new BigInt64Array(raw.buffer, 0, raw.length / 8)].map(Number);
  }
  return (t.int64Data ?? []).map(Number);
}

/** Sorts the Concat's readers into Shape nodes and branches (direct, or repeat_kv), or says which reader does not fit. */
function readersOf(idx: GraphIndex, out: string): Readers | string {
  const shapes: NodeProto[] = [];
  const branches: Branch[] = [{ chain: [], out }];
  for (const r of idx.consumersOf(out)) {
    if (r.opType === 'Shape') shapes.push(r);
    else if (r.opType === 'Unsqueeze') {
      const [expand, ...more] = idx.consumersOf(r.output![0]);
      const [reshape, ...more2] = expand ? idx.consumersOf(expand.output![0]) : [];
      const axes = r.input?.[1] ? constInts(idx, r.input[1]) : attrInts(r, 'axes') ?? null;
      if (axes?.length !== 1 || axes[0] !== 2 || expand?.opType !== 'Expand' || more.length || reshape?.opType !== 'Reshape' || more2.length) {
        return `${r.name} reads the cache through Unsqueeze but not as repeat_kv's Unsqueeze(axis 2) → Expand → Reshape`;
      }
      branches.push({ chain: [r, expand, reshape], out: reshape.output![0] });
    }
  }
  return { shapes, branches };
}

/** A branch's readers other than the chains and Shapes that start from it. */
const attentionReaders = (idx: GraphIndex, b: Branch, all: Readers) =>
  idx.consumersOf(b.out).filter((n) => !all.shapes.includes(n) && !all.branches.some((o) => o.chain[0] === n));

/**
 * scores = q · [past; new]ᵀ  →  Concat(q · pastᵀ, q · newᵀ)
 * ctx    = p · [past; new]   →  p[..., :P] · past + p[..., P:] · new
 * Shape([past; new]) → Shape(new) with the sequence length past + new.
 * repeat_kv([past; new]) → repeat_kv(past), repeat_kv(new), each read as above.
 * Returns why it applied, or why not (nothing is changed then).
 */
function splitAttention(g: GraphEditor, keyConcat: NodeProto, valueConcat: NodeProto): string[] | string {
  const idx = g.index();
  const keys = readersOf(idx, keyConcat.output![0]);
  if (typeof keys === 'string') return keys;
  const values = readersOf(idx, valueConcat.output![0]);
  if (typeof values === 'string') return values;

  const scoreMatMuls: { branch: Branch; transpose: NodeProto; matmul: NodeProto }[] = [];
  for (const b of keys.branches) {
    for (const t of attentionReaders(idx, b, keys)) {
      if (t.opType !== 'Transpose' || !isLastTwoSwap(attrInts(t, 'perm'))) return `${t.name} (${t.opType}) reads the keys; expected a Transpose of the last two axes into a MatMul`;
      for (const m of idx.consumersOf(t.output![0])) {
        if (m.opType !== 'MatMul' || m.input![1] !== t.output![0]) return `${m.name} (${m.opType}) reads the transposed keys; expected MatMul(q, kᵀ)`;
        scoreMatMuls.push({ branch: b, transpose: t, matmul: m });
      }
    }
  }
  const contextMatMuls: { branch: Branch; matmul: NodeProto }[] = [];
  for (const b of values.branches) {
    for (const m of attentionReaders(idx, b, values)) {
      if (m.opType !== 'MatMul' || m.input![1] !== b.out) return `${m.name} (${m.opType}) reads the values; expected MatMul(probs, v)`;
      contextMatMuls.push({ branch: b, matmul: m });
    }
  }
  if (!scoreMatMuls.length || !contextMatMuls.length) return 'no attention MatMul reads the cache';

  const dead = new Set<NodeProto>();
  const how = new Set<string>(['scores and context over past and new separately']);
  g.scope('/deltaserve/attention', () => {
    // Each chain is applied to past and new: Expand to [1, 1, n_rep, 1, 1] (broadcast keeps the
    // part's own length), Reshape to [batch, heads, -1, head_dim] (taken from the original shapes).
    const applyChain = (chain: NodeProto[], x: string): string => {
      if (!chain.length) return x;
      const [unsq, expand, reshape] = chain;
      const u = g.op('Unsqueeze', [x, ...unsq.input!.slice(1)], Object.fromEntries((unsq.attribute ?? []).map((a) => [a.name!, a])));
      const nRep = g.op('Slice', [expand.input![1], g.ints([2]), g.ints([3]), g.ints([0])]);
      const e = g.op('Expand', [u, g.op('Concat', [g.ints([1, 1]), nRep, g.ints([1, 1])], { axis: 0 })]);
      const target = reshape.input![1];
      const shape = g.op('Concat', [
        g.op('Slice', [target, g.ints([0]), g.ints([2]), g.ints([0])]), g.ints([-1]),
        g.op('Slice', [target, g.ints([3]), g.ints([4]), g.ints([0])]),
      ], { axis: 0 });
      return g.op('Reshape', [e, shape]);
    };
    const parts = (concat: NodeProto, b: Branch) => {
      if (b.chain.length) {
        how.add('repeat_kv applied to past and new separately');
        b.chain.forEach((n) => dead.add(n));
      }
      return concat.input!.map((x) => applyChain(b.chain, x)) as [string, string];
    };
    const split = new Map<Branch, [string, string]>();
    const partsOf = (concat: NodeProto, b: Branch) => {
      let p = split.get(b);
      if (!p) split.set(b, (p = parts(concat, b)));
      return p;
    };

    for (const { branch, transpose, matmul } of scoreMatMuls) {
      const [pastK, newK] = partsOf(keyConcat, branch);
      const perm = { perm: [0, 1, 3, 2] };
      const q = matmul.input![0];
      g.opNamed('Concat', [g.op('MatMul', [q, g.op('Transpose', [pastK], perm)]), g.op('MatMul', [q, g.op('Transpose', [newK], perm)])], matmul.output![0], { axis: -1 });
      dead.add(matmul).add(transpose);
    }
    const pastLen = g.op('Slice', [g.op('Shape', [valueConcat.input![0]]), g.ints([2]), g.ints([3]), g.ints([0])]);
    for (const { branch, matmul } of contextMatMuls) {
      const [pastV, newV] = partsOf(valueConcat, branch);
      const probs = matmul.input![0];
      const pPast = g.op('Slice', [probs, g.ints([0]), pastLen, g.ints([-1])]);
      const pNew = g.op('Slice', [probs, pastLen, g.ints([Number.MAX_SAFE_INTEGER]), g.ints([-1])]);
      g.opNamed('Add', [g.op('MatMul', [pPast, pastV]), g.op('MatMul', [pNew, newV])], matmul.output![0]);
      dead.add(matmul);
    }
    // Shape(Concat(past, new)) = Shape(new) with axis 2 = past + new.
    for (const [concat, readers] of [[keyConcat, keys], [valueConcat, values]] as const) {
      if (!readers.shapes.length) continue;
      how.add('Shape readers given the shape computed from past and new');
      const [past, next] = concat.input!;
      const pastShape = g.op('Shape', [past]);
      const newShape = g.op('Shape', [next]);
      const dim = (s: string, a: number) => g.op('Slice', [s, g.ints([a]), g.ints([a + 1]), g.ints([0])]);
      const full = g.op('Concat', [
        g.op('Slice', [newShape, g.ints([0]), g.ints([2]), g.ints([0])]),
        g.op('Add', [dim(pastShape, 2), dim(newShape, 2)]),
        g.op('Slice', [newShape, g.ints([3]), g.ints([Number.MAX_SAFE_INTEGER]), g.ints([0])]),
      ], { axis: 0 });
      for (const sh of readers.shapes) {
        const start = attrInt(sh, 'start');
        const end = attrInt(sh, 'end');
        if (start === undefined && end === undefined) g.opNamed('Identity', [full], sh.output![0]);
        else g.opNamed('Slice', [full, g.ints([start ?? 0]), g.ints([end ?? Number.MAX_SAFE_INTEGER]), g.ints([0])], sh.output![0]);
        dead.add(sh);
      }
    }
  });
  g.removeNodes(dead);
  return [...how];
}
