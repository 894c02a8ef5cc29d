/**
 * 8-bit weights for ONNX MatMulInteger, quantized as onnxruntime's
 * `quantize_dynamic` quantizes them (onnxruntime/python/tools/quantization:
 * quant_utils.quantize_data, compute_scale_zp, quantize_nparray), the format of
 * onnx-community's `model_quantized.onnx`. No npm package writes it.
 *
 * A weight W [K, N] (MatMul's layout) gets one scale and zero point for the
 * whole tensor, or one per output feature (per channel, axis −1), and element
 * (k, n) dequantizes as `(q[k, n] − zero_point[n]) · scale[n]`.
 *
 * - int8 weights are symmetric (onnxruntime's default for QInt8): zero point 0,
 *   range ±127, or ±64 with reduce_range.
 * - uint8 weights are asymmetric: range [0, 255], or [0, 127] with reduce_range;
 *   the float range is widened to hold 0 so zero stays exact.
 * - codes are round-half-to-even of `w / scale` (numpy's round, in float32) plus
 *   the zero point, clipped to the type's full range.
 */

import type { GraphIndex } from '../onnx/graph-index.js';
import type { NodeProto } from '../onnx/proto.js';


export type IntegerWeightType = 'int8' | 'uint8';

export interface IntegerWeightOptions {
  weightType: IntegerWeightType;
  /** One scale and zero point per output feature (onnxruntime's per_channel). */
  perChannel: boolean;
  /** 7-bit ranges (onnxruntime's reduce_range: no overflow in the u8·s8 kernels of older CPUs). */
  reduceRange: boolean;
}

export interface IntegerQuantized {
  K: number;
  N: number;
  /** [K, N] codes: Int8Array for int8, Uint8Array for uint8. */
  codes: Int8Array | Uint8Array;
  /** [N] per channel, else [1]. */
  scales: Float32Array;
  /** Same length as scales, of the weight's type. */
  zeroPoints: Int8Array | Uint8Array;
}

const FLOAT32_TINY = 1.1754943508222875e-38;

/** numpy.round: half to even. */
export function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** quant_utils.get_qmin_qmax_for_qType. */
function qRange(type: IntegerWeightType, reduceRange: boolean, symmetric: boolean): [number, number] {
  if (type === 'uint8') return reduceRange ? [0, 127] : [0, 255];
  if (reduceRange) return [-64, 64];
  return symmetric ? [-127, 127] : [-128, 127];
}

/** quant_utils.compute_scale_zp, for one range. */
function scaleAndZeroPoint(rmin: number, rmax: number, qmin: number, qmax: number, symmetric: boolean): { scale: number; zeroPoint: number } {
  let lo = Math.min(rmin, 0);
  let hi = Math.max(rmax, 0);
  if (symmetric) {
    const absmax = Math.max(Math.abs(lo), Math.abs(hi));
    lo = -absmax;
    hi = absmax;
  }
  // In float64, as numpy computes it; the zero point reads this unrounded scale.
  const scale = (hi - lo) / (qmax - qmin);
  if (scale < FLOAT32_TINY) return { scale: 1, zeroPoint: 0 };
  const zeroPoint = symmetric ? roundHalfEven((qmin + qmax) / 2) : roundHalfEven(qmin - lo / scale);
  return { scale: Math.fround(scale), zeroPoint };
}

/** Quantizes W [K, N], given as `weight(k, n)`. */
export function quantizeInteger(weight: (k: number, n: number) => number, K: number, N: number, opts: IntegerWeightOptions): IntegerQuantized {
  const symmetric = opts.weightType === 'int8';
  const [qmin, qmax] = qRange(opts.weightType, opts.reduceRange, symmetric);
  // quantize_nparray clips to the type's full range, whatever range chose the scale.
  const [cmin, cmax] = opts.weightType === 'uint8' ? [0, 255] : [-128, 127];
  const groups = opts.perChannel ? N : 1;
  const codes = opts.weightType === 'int8' ? new Int8Array(K * N) : new Uint8Array(K * N);
  const scales = new Float32Array(groups);
  const zeroPoints = opts.weightType === 'int8' ? new Int8Array(groups) : new Uint8Array(groups);
  const W = new Float32Array(K * N);
  for (let k = 0; k < K; k++) for (let n = 0; n < N; n++) W[k * N + n] = weight(k, n);
  // A group is one column (per channel) or the whole weight: its elements are (k, n) for n in [n0, n1).
  for (let g = 0; g < groups; g++) {
    const [n0, n1] = opts.perChannel ? [g, g + 1] : [0, N];
    let rmin = Infinity;
    let rmax = -Infinity;
    for (let k = 0; k < K; k++) for (let n = n0; n < n1; n++) {
      const w = W[k * N + n];
      if (w < rmin) rmin = w;
      if (w > rmax) rmax = w;
    }
    const { scale, zeroPoint } = scaleAndZeroPoint(rmin, rmax, qmin, qmax, symmetric);
    scales[g] = scale;
    zeroPoints[g] = zeroPoint;
    for (let k = 0; k < K; k++) for (let n = n0; n < n1; n++) {
      const q = roundHalfEven(Math.fround(W[k * N + n] / scale)) + zeroPoint;
      codes[k * N + n] = Math.min(cmax, Math.max(cmin, q));
    }
  }
  return { K, N, codes, scales, zeroPoints };
}

/**
 * The Cast → Mul chain quantize_dynamic puts after a MatMulInteger: the int32 product cast to float and
 * multiplied by a Mul of the activation's scale (`activationScale`) and the weight's; null when the graph
 * is not in that layout.
 */
export function matmulIntegerChain(index: GraphIndex, matmul: NodeProto, activationScale: string) {
  const only = (tensor: string, opType: string) => {
    const next = index.consumersOf(tensor);
    return next.length === 1 && next[0].opType === opType ? next[0] : null;
  };
  const cast = only(matmul.output![0], 'Cast');
  const mul = cast && only(cast.output![0], 'Mul');
  const scalesMul = mul && index.producer.get(mul.input!.find((i) => i !== cast.output![0])!);
  if (!cast || !mul || scalesMul?.opType !== 'Mul' || !scalesMul.input!.includes(activationScale)) return null;
  return { cast, mul, scalesMul, weightScale: scalesMul.input!.find((i) => i !== activationScale)! };
}
