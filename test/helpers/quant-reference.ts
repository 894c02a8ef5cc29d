/**
 * The independent side of the quantization tests: onnxruntime's MatMulNBits
 * dequantization written out plainly from its contrib-op documentation (not
 * from src/backbone/quant), and a float reference model built from a
 * quantized one by replacing each MatMulNBits with a MatMul on its
 * dequantized weight, optionally with LoRA factors merged in.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { attrInt, DataType, encodeModel, floatData, floatTensor, onnx, type ModelProto, type NodeProto, type TensorProto } from '../../src/backbone/onnx/proto.js';

export interface NBitsWeight {
  N: number;
  K: number;
  bits: number;
  blockSize: number;
  B: Uint8Array;
  scales: Float32Array;
  zeroPoints: Uint8Array | null;
}

/** W [N, K]: element k of row n is (code − zero point) · scale of its block; codes low bits first. */
export function dequantizePlain(w: NBitsWeight): Float32Array {
  const { N, K, bits, blockSize } = w;
  const nBlocks = Math.ceil(K / blockSize);
  const blob = (blockSize * bits) / 8;
  const zpRow = Math.ceil((nBlocks * bits) / 8);
  const perByte = 8 / bits;
  const mask = (1 << bits) - 1;
  const unpack = (bytes: Uint8Array, base: number, i: number) => (bytes[base + Math.floor(i / perByte)] >> ((i % perByte) * bits)) & mask;
  const out = new Float32Array(N * K);
  for (let n = 0; n < N; n++) {
    for (let k = 0; k < K; k++) {
      const b = Math.floor(k / blockSize);
      const code = unpack(w.B, (n * nBlocks + b) * blob, k % blockSize);
      // Without zero points the documented default is the middle code, 2^(bits−1).
      const zp = w.zeroPoints ? unpack(w.zeroPoints, n * zpRow, b) : 1 << (bits - 1);
      out[n * K + k] = (code - zp) * w.scales[n * nBlocks + b];
    }
  }
  return out;
}

const bytesOf = (t: TensorProto) => t.rawData ?? new Uint8Array(0);

/** A MatMulNBits node's weight, read from the model's initializers. */
export function nbitsWeight(node: NodeProto, inits: Map<string, TensorProto>): NBitsWeight {
  const zp = node.input?.[3] ? inits.get(node.input[3]) : undefined;
  return {
    N: attrInt(node, 'N')!, K: attrInt(node, 'K')!, bits: attrInt(node, 'bits') ?? 4, blockSize: attrInt(node, 'block_size')!,
    B: bytesOf(inits.get(node.input![1])!), scales: floatData(inits.get(node.input![2])!), zeroPoints: zp ? bytesOf(zp) : null,
  };
}

/** LoRA factors per module: A [r, K], B [N, r], and the scale alpha/r. */
export type LoraFactors = Map<string, { A: Float32Array; B: Float32Array; r: number; scale: number }>;

const moduleOf = (nodeName: string) => nodeName.split('/').filter(Boolean).slice(0, -1).join('.');

/**
 * The quantized model with each MatMulNBits replaced by a MatMul on
 * dequant(W) (+ scale·B·A for modules the LoRA targets), as [K, N].
 */
export function dequantizedModel(model: ModelProto, lora: LoraFactors = new Map()): Uint8Array {
  const graph = model.graph!;
  const inits = new Map((graph.initializer ?? []).map((t) => [t.name!, t]));
  const added: TensorProto[] = [];
  const dropped = new Set<string>();
  const nodes = (graph.node ?? []).map((n) => {
    if (n.opType !== 'MatMulNBits') return n;
    const w = nbitsWeight(n, inits);
    const W = dequantizePlain(w);
    const f = lora.get(moduleOf(n.name!));
    if (f) {
      for (let o = 0; o < w.N; o++) {
        for (let k = 0; k < w.K; k++) {
          let s = 0;
          for (let j = 0; j < f.r; j++) s += f.B[o * f.r + j] * f.A[j * w.K + k];
          W[o * w.K + k] += f.scale * s;
        }
      }
    }
    const Wt = new Float32Array(w.K * w.N);
    for (let o = 0; o < w.N; o++) for (let k = 0; k < w.K; k++) Wt[k * w.N + o] = W[o * w.K + k];
    const name = `${n.input![1]}.dequantized`;
    added.push(floatTensor(name, Wt, [w.K, w.N]));
    for (const i of n.input!.slice(1)) dropped.add(i);
    return { name: `${n.name}_as_MatMul`, opType: 'MatMul', input: [n.input![0], name], output: n.output };
  });
  const initializer = [...(graph.initializer ?? []).filter((t) => !dropped.has(t.name!)), ...added];
  return encodeModel(onnx.ModelProto.create({
    ...model, opsetImport: (model.opsetImport ?? []).filter((o) => o.domain !== 'com.microsoft'), graph: { ...graph, node: nodes, initializer },
  }));
}

/** A one-node model computing MatMulNBits(A [M, K], B, scales, zero_points), for checking the format against onnxruntime. */
export function oneNodeModel(w: NBitsWeight, M: number): Uint8Array {
  const u8 = (name: string, data: Uint8Array, dims: number[]): TensorProto => ({ name, dataType: DataType.UINT8, dims, rawData: data });
  const nBlocks = Math.ceil(w.K / w.blockSize);
  const inits = [
    u8('B', w.B, [w.N, nBlocks, (w.blockSize * w.bits) / 8]),
    floatTensor('scales', w.scales, [w.scales.length]),
    ...(w.zeroPoints ? [u8('zp', w.zeroPoints, [w.zeroPoints.length])] : []),
  ];
  const I = onnx.AttributeProto.AttributeType.INT;
  const vi = (name: string, dims: number[]) => ({ name, type: { tensorType: { elemType: DataType.FLOAT, shape: { dim: dims.map((d) => ({ dimValue: d })) } } } });
  return encodeModel(onnx.ModelProto.create({
    irVersion: 8,
    opsetImport: [{ domain: '', version: 17 }, { domain: 'com.microsoft', version: 1 }],
    graph: {
      name: 'nbits',
      node: [{
        name: 'q', opType: 'MatMulNBits', domain: 'com.microsoft', input: ['A', 'B', 'scales', ...(w.zeroPoints ? ['zp'] : [])], output: ['Y'],
        attribute: [['K', w.K], ['N', w.N], ['bits', w.bits], ['block_size', w.blockSize]].map(([name, i]) => ({ name: name as string, type: I, i: i as number })),
      }],
      initializer: inits,
      input: [vi('A', [M, w.K])],
      output: [vi('Y', [M, w.N])],
    },
  }));
}

/** A PEFT LoRA's factors, read straight from its files (safetensors: 8-byte header length, JSON header, little-endian F32 data). */
export function peftLoraFactors(dir: string): LoraFactors {
  const config = JSON.parse(readFileSync(join(dir, 'adapter_config.json'), 'utf8')) as { r: number; lora_alpha: number };
  const bytes = readFileSync(join(dir, 'adapter_model.safetensors'));
  const headerLen = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + headerLen).toString('utf8')) as Record<string, { dtype: string; data_offsets: [number, number] }>;
  const tensor = (name: string) => {
    const t = header[name];
    if (t.dtype !== 'F32') throw new Error(`${name} is ${t.dtype}; this reader takes F32`);
    const raw = bytes.subarray(8 + headerLen + t.data_offsets[0], 8 + headerLen + t.data_offsets[1]);
    return new Float32Array(Uint8Array.from(raw).buffer);
  };
  const out: LoraFactors = new Map();
  for (const key of Object.keys(header)) {
    const m = /^base_model\.model\.(.+)\.lora_A\.weight$/.exec(key);
    if (!m) continue;
    out.set(m[1], { A: tensor(key), B: tensor(`base_model.model.${m[1]}.lora_B.weight`), r: config.r, scale: config.lora_alpha / config.r });
  }
  return out;
}

// ------------------------------------------------- MatMulInteger (quantize_dynamic's layout)

/** An 8-bit weight as ONNX DequantizeLinear reads it: W[k, n] = (q[k, n] − zp[n]) · scale[n] (or one zp and scale for all). */
export function dequantizeIntegerPlain(codes: TensorProto, scale: TensorProto, zeroPoint: TensorProto | undefined): Float32Array {
  const [K, N] = codes.dims!.map(Number);
  const raw = bytesOf(codes);
  const signed = codes.dataType === DataType.INT8;
  const code = (bytes: Uint8Array, i: number) => (signed ? (bytes[i] << 24) >> 24 : bytes[i]);
  const s = floatData(scale);
  const zp = zeroPoint ? bytesOf(zeroPoint) : new Uint8Array(s.length);
  const out = new Float32Array(K * N);
  for (let k = 0; k < K; k++) {
    for (let n = 0; n < N; n++) {
      const c = s.length === 1 ? 0 : n;
      out[k * N + n] = (code(raw, k * N + n) - code(zp, c)) * s[c];
    }
  }
  return out;
}

/**
 * The reference for a MatMulInteger model: each `MatMulInteger → Cast → Mul`
 * becomes a float MatMul of the dequantized activations (the model's own
 * DynamicQuantizeLinear, then the standard DequantizeLinear) and the plainly
 * dequantized weight. A LoRA, where given, is merged as a dense
 * ΔW = scale·(B·A)ᵀ applied to the float input x — the layer's activations
 * are quantized for its integer product only, never for a delta beside it.
 */
export function dequantizedIntegerModel(model: ModelProto, lora: LoraFactors = new Map()): Uint8Array {
  const graph = model.graph!;
  const inits = new Map((graph.initializer ?? []).map((t) => [t.name!, t]));
  const producer = new Map((graph.node ?? []).flatMap((n) => (n.output ?? []).map((o) => [o, n] as const)));
  const consumer = (t: string) => (graph.node ?? []).find((n) => n.input?.includes(t))!;
  const added: TensorProto[] = [];
  const replaced = new Set<NodeProto>();
  const extrasAt = new Map<NodeProto, NodeProto[]>();
  for (const mm of (graph.node ?? []).filter((n) => n.opType === 'MatMulInteger')) {
    const dql = producer.get(mm.input![0])!;
    const cast = consumer(mm.output![0]);
    const mul = consumer(cast.output![0]);
    const [xq, xScale, xZp] = dql.output!;
    const scalesMul = producer.get(mul.input!.find((i) => i !== cast.output![0])!)!;
    const wScale = inits.get(scalesMul.input!.find((i) => i !== xScale)!)!;
    const W = dequantizeIntegerPlain(inits.get(mm.input![1])!, wScale, mm.input![3] ? inits.get(mm.input![3]) : undefined);
    const [K, N] = inits.get(mm.input![1])!.dims!.map(Number);
    const base = mm.name!;
    added.push(floatTensor(`${base}/W_dequantized`, W, [K, N]));
    replaced.add(mm).add(cast).add(mul);
    const extra: NodeProto[] = [];
    extrasAt.set(mm, extra);
    extra.push(
      { name: `${base}/x_dequantize`, opType: 'DequantizeLinear', input: [xq, xScale, xZp], output: [`${base}/x_dequantized`] },
      { name: `${base}/as_MatMul`, opType: 'MatMul', input: [`${base}/x_dequantized`, `${base}/W_dequantized`], output: [lora.has(moduleOf(base)) ? `${base}/y` : mul.output![0]] },
    );
    const f = lora.get(moduleOf(base));
    if (f) {
      const dW = new Float32Array(K * N);
      for (let k = 0; k < K; k++) {
        for (let o = 0; o < N; o++) {
          let s = 0;
          for (let j = 0; j < f.r; j++) s += f.B[o * f.r + j] * f.A[j * K + k];
          dW[k * N + o] = f.scale * s;
        }
      }
      added.push(floatTensor(`${base}/delta_W`, dW, [K, N]));
      extra.push(
        { name: `${base}/delta`, opType: 'MatMul', input: [dql.input![0], `${base}/delta_W`], output: [`${base}/delta_y`] },
        { name: `${base}/plus_delta`, opType: 'Add', input: [`${base}/y`, `${base}/delta_y`], output: [mul.output![0]] },
      );
    }
  }
  // In the MatMulInteger's place: everything they read is produced before it.
  const nodes = (graph.node ?? []).flatMap((n) => extrasAt.get(n) ?? (replaced.has(n) ? [] : [n]));
  return encodeModel(onnx.ModelProto.create({ ...model, graph: { ...graph, node: nodes, initializer: [...(graph.initializer ?? []), ...added] } }));
}
