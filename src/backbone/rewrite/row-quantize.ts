/**
 * Batch-invariant activations for MatMulInteger backbones (onnxruntime
 * quantize_dynamic's layout). The model's DynamicQuantizeLinear takes ONE
 * scale and zero point over its whole input, so in a batch a row's codes
 * would depend on its batchmates' (and its left padding's) range. Each
 * DynamicQuantizeLinear is replaced by the same arithmetic done per row over
 * that row's real positions of the step (the attention mask's new columns),
 * so a row gets exactly the codes DynamicQuantizeLinear gives it run alone.
 *
 * onnxruntime's CPU MatMulInteger takes only a scalar a_zero_point, so the
 * per-row zero point is taken out exactly in int32 afterwards:
 *   Σ_k (q_k − zp_r)(w_kn − wzp_n) = MatMulInteger(q, W, 0, wzp) − zp_r · colsum_n,
 * with colsum_n = Σ_k (w_kn − wzp_n) computed here from the initializer.
 * The result is then cast and scaled as the original chain does:
 * Cast(int32) · (scale_r · w_scale).
 */
import { DataType } from '../onnx/graph-builder.js';
import { dimsOf, tensorBytes, type NodeProto, type TensorProto } from '../onnx/proto.js';
import type { GraphIndex } from '../onnx/graph-index.js';
import { matmulIntegerChain } from '../quant/matmul-integer.js';
import type { GraphEditor } from './editor.js';

/** Ops between a DynamicQuantizeLinear's codes and a MatMulInteger that keep each row's codes (lm_head's last-position slice). */
const CODE_VIEWS = new Set(['Slice', 'Reshape', 'Flatten', 'Squeeze', 'Unsqueeze', 'Identity']);

/** |Σ_k (q − zp)(w − wzp)| ≤ K·255·255 must fit int32, as in onnxruntime's own accumulation. */
const MAX_K = Math.floor(0x7fffffff / (255 * 255));

interface RowQuantized {
  /** uint8 codes, the input's shape. */
  q: string;
  /** [batch, 1, 1] float32. */
  scale: string;
  /** [batch, 1, 1] int32. */
  zeroPoint: string;
}

/** One column sum per output feature of W [K, N] (int8 or uint8), less its zero point(s): int32 [N]. */
function columnSums(weight: TensorProto, zeroPoint: TensorProto | undefined, baseDir: string): Int32Array {
  const [K, N] = dimsOf(weight);
  if (K > MAX_K) throw new Error(`MatMulInteger weight ${weight.name} has K = ${K} inputs: its per-row correction would overflow int32 (at most ${MAX_K})`);
  const signed = weight.dataType === DataType.INT8;
  const code = (bytes: Uint8Array, i: number) => (signed ? (bytes[i] << 24) >> 24 : bytes[i]);
  const w = tensorBytes(weight, baseDir);
  const zp = zeroPoint ? tensorBytes(zeroPoint, baseDir) : new Uint8Array(1);
  const perChannel = zp.length > 1;
  const sums = new Int32Array(N);
  for (let k = 0; k < K; k++) for (let n = 0; n < N; n++) sums[n] += code(w, k * N + n);
  for (let n = 0; n < N; n++) sums[n] -= K * code(zp, perChannel ? n : 0);
  return sums;
}

export class RowQuantizer {
  private rowMask: string | null = null;
  private batch: string | null = null;
  private colsumNo = 0;

  constructor(private readonly g: GraphEditor, private readonly opset: number, private readonly baseDir: string) {}

  /** [batch] as a 1-D int64 tensor. */
  private batchDim(): string {
    this.batch ??= this.g.op('Slice', [this.g.op('Shape', ['input_ids']), this.g.ints([0]), this.g.ints([1]), this.g.ints([0])]);
    return this.batch;
  }

  /** [batch, seq, 1] bool: which of the step's new positions are real (left padding is not). */
  private mask(): string {
    const g = this.g;
    if (!this.rowMask) {
      const ids = g.op('Shape', ['input_ids']);
      const seq = g.op('Slice', [ids, g.ints([1]), g.ints([2]), g.ints([0])]);
      const newColumns = g.op('Slice', ['attention_mask', g.op('Neg', [seq]), g.ints([Number.MAX_SAFE_INTEGER]), g.ints([1])]);
      const asBool = g.op('Cast', [newColumns], { to: DataType.BOOL });
      this.rowMask = g.op('Reshape', [asBool, g.op('Concat', [ids, g.ints([1])], { axis: 0 })]);
    }
    return this.rowMask;
  }

  /** ReduceMin/ReduceMax over every axis but the batch's, kept: axes moved from attribute to input at opset 18. */
  private reduce(op: 'ReduceMin' | 'ReduceMax', x: string): string {
    return this.opset >= 18 ? this.g.op(op, [x, this.g.ints([1, 2])], { keepdims: 1 }) : this.g.op(op, [x], { axes: [1, 2], keepdims: 1 });
  }

  /**
   * DynamicQuantizeLinear per row, in its float32 arithmetic (onnx's spec and
   * onnxruntime's GetQuantizationParameter / MlasQuantizeLinear):
   * lo = min(0, min x), hi = max(0, max x), scale = (hi − lo) / 255 (1 when hi = lo),
   * zp = round_half_even(clip(0 − lo / scale, 0, 255)), q = clip(round_half_even(x / scale) + zp, 0, 255).
   * Padded positions are zeroed first: 0 is inside the range anyway, so they change nothing for the row.
   */
  quantize(x: string): RowQuantized {
    const g = this.g;
    const x3 = g.op('Reshape', [x, g.op('Concat', [this.batchDim(), g.ints([-1]), g.op('Slice', [g.op('Shape', [x]), g.ints([-1]), g.ints([Number.MAX_SAFE_INTEGER]), g.ints([0])])], { axis: 0 })]);
    const zero = g.scalar(0);
    const xm = g.op('Where', [this.mask(), x3, zero]);
    const lo = g.op('Min', [this.reduce('ReduceMin', xm), zero]);
    const hi = g.op('Max', [this.reduce('ReduceMax', xm), zero]);
    const scale = g.op('Where', [g.op('Equal', [hi, lo]), g.scalar(1), g.op('Div', [g.op('Sub', [hi, lo]), g.scalar(255)])]);
    const qmax = g.scalar(255);
    const zpFloat = g.op('Round', [g.op('Clip', [g.op('Sub', [zero, g.op('Div', [lo, scale])]), zero, qmax])]);
    const q3 = g.op('Cast', [g.op('Clip', [g.op('Add', [g.op('Round', [g.op('Div', [xm, scale])]), zpFloat]), zero, qmax])], { to: DataType.UINT8 });
    const q = g.op('Reshape', [q3, g.op('Shape', [x])]);
    return { q, scale, zeroPoint: g.op('Cast', [zpFloat], { to: DataType.INT32 }) };
  }

  /**
   * A MatMulInteger (→ Cast → Mul by Mul(x_scale, w_scale)) fed row-quantized codes: the same
   * product, corrected for each row's zero point, under the chain's own output name.
   */
  product(idx: GraphIndex, matmul: NodeProto, row: RowQuantized, wScale: string, output: string): void {
    const g = this.g;
    const weight = idx.initializers.get(matmul.input![1])!;
    const wZp = matmul.input![3] ? idx.initializers.get(matmul.input![3]) : undefined;
    const N = dimsOf(weight)[1];
    const colsum = g.initializer({
      name: `deltaserve::colsum_${this.colsumNo++}`, dataType: DataType.INT32, dims: [N],
      rawData: new Uint8Array(columnSums(weight, wZp, this.baseDir).buffer),
    });
    const a = g.op('MatMulInteger', [matmul.input![0], matmul.input![1], '', ...(matmul.input![3] ? [matmul.input![3]] : [])]);
    const a3 = g.op('Reshape', [a, g.op('Concat', [this.batchDim(), g.ints([-1, N])], { axis: 0 })]);
    const exact = g.op('Sub', [a3, g.op('Mul', [row.zeroPoint, colsum])]);
    const y3 = g.op('Mul', [g.op('Cast', [exact], { to: DataType.FLOAT }), g.op('Mul', [row.scale, wScale])]);
    g.opNamed('Reshape', [y3, g.op('Shape', [a])], output);
  }
}

/**
 * Replaces every top-level DynamicQuantizeLinear that feeds MatMulIntegers
 * (directly or through lm_head's slice) with the per-row quantization above.
 * Returns how many were replaced. Run after the passes that add their own
 * (last-logits, delta-sites).
 */
export function quantizeActivationsPerRow(g: GraphEditor, opset: number, baseDir: string): number {
  const idx = g.index();
  const rq = new RowQuantizer(g, opset, baseDir);
  const dead = new Set<NodeProto>();
  let replaced = 0;
  for (const dql of g.nodes.filter((n) => n.opType === 'DynamicQuantizeLinear')) {
    const [codes, scale, zeroPoint] = dql.output!;
    // The MatMulIntegers reading the codes, through views.
    const matmuls: NodeProto[] = [];
    const walk = (t: string) => {
      for (const c of idx.consumersOf(t)) {
        if (c.opType === 'MatMulInteger' && c.input![0] === t) matmuls.push(c);
        else if (CODE_VIEWS.has(c.opType!) && c.input![0] === t) walk(c.output![0]);
        else throw new Error(`DynamicQuantizeLinear ${dql.name}: its codes reach ${c.opType} ${c.name}, not a MatMulInteger; cannot quantize per row`);
      }
    };
    walk(codes);
    // One a site's requantization left unread (pruned later).
    if (!matmuls.length) continue;
    const chains = matmuls.map((mm) => {
      const chain = matmulIntegerChain(idx, mm, scale);
      if (!chain || mm.input![2] !== zeroPoint) throw new Error(`MatMulInteger ${mm.name} is not followed by quantize_dynamic's Cast → Mul by (x_scale · w_scale); cannot quantize per row`);
      return { mm, ...chain };
    });
    g.scope(`/deltaserve/row_quantize/${dql.name}`, () => {
      const row = rq.quantize(dql.input![0]);
      // The codes keep their tensor name, so lm_head's views still read them.
      g.opNamed('Identity', [row.q], codes);
      for (const c of chains) {
        rq.product(idx, c.mm, row, c.weightScale, c.mul.output![0]);
        dead.add(c.mm).add(c.cast).add(c.mul);
      }
    });
    dead.add(dql);
    replaced++;
  }
  g.removeNodes(dead);
  return replaced;
}
