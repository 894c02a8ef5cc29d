/**
 * `deltaserve quantize`: a quantized copy of a float export. Every linear
 * module's MatMul/Gemm becomes, in the same node scope (so module names, delta
 * sites and PEFT targets stay what they were), either onnxruntime's
 * MatMulNBits over its weight quantized block-wise (matmul-nbits.ts), or — the
 * `integer` format — the layout onnxruntime's `quantize_dynamic` writes
 * (onnx-community's `model_quantized.onnx`): DynamicQuantizeLinear on the
 * input, MatMulInteger on 8-bit weights (matmul-integer.ts), Cast, and a Mul by
 * the product of the two scales. Embeddings (Gather) are not linears and stay
 * float; `lm_head` stays float unless asked.
 */
import { copyFile, mkdir, readdir, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { GraphEditor } from '../rewrite/editor.js';
import { findLinearModules, type LinearSite } from '../modules.js';
import { readModelDir } from '../model-dir.js';
import {
  attribute, DataType, dimsOf, encodeModel, floatData, floatTensor, onnx, tensorBytes, attrInt,
  type ModelProto, type NodeProto, type TensorProto,
} from '../onnx/proto.js';
import { quantizeInteger, type IntegerWeightOptions } from './matmul-integer.js';
import { blobSize, blocksPerRow, quantizeBlockwise, quantizedBytes, type Bits } from './matmul-nbits.js';

export const MS_DOMAIN = 'com.microsoft';
const PROTOBUF_LIMIT = 2 ** 31 - 2 ** 24;

export type QuantizeFormat = 'nbits' | 'integer';

/** onnxruntime's defaults as onnx-community's conversion script calls quantize_dynamic: int8 weights, per channel, reduce_range. */
export const INTEGER_DEFAULTS: IntegerWeightOptions = { weightType: 'int8', perChannel: true, reduceRange: true };

export interface QuantizeOptions {
  /** MatMulNBits (the default), or MatMulInteger behind DynamicQuantizeLinear (8-bit only). */
  format?: QuantizeFormat;
  bits: Bits;
  /** MatMulNBits only. */
  blockSize: number;
  /** Quantize lm_head too (off by default: the logits are the most sensitive product of the model). */
  includeLmHead?: boolean;
  /**
   * MatMulNBits' accuracy_level: 0 lets onnxruntime compute in float32 on
   * dequantized blocks; 4 lets it quantize activations to int8 on the fly
   * (faster on CPUs with int8 dot products, less exact).
   */
  accuracyLevel?: number;
  /** The integer format's weights (INTEGER_DEFAULTS unless given). */
  integer?: IntegerWeightOptions;
}

export interface QuantizeReport {
  quantized: string[];
  /** Left float, with why. */
  skipped: { module: string; reason: string }[];
  floatBytes: number;
  quantizedBytes: number;
}

const isLmHead = (name: string) => /(^|\.)lm_head$/.test(name);
const floatAttrOf = (node: NodeProto, name: string) => node.attribute?.find((a) => a.name === name)?.f;

/** Why a linear cannot become a MatMulNBits as it stands, or null. */
function unsupported(site: LinearSite, weight: TensorProto): string | null {
  const n = site.node;
  if (weight.dataType !== DataType.FLOAT) return `its weight is not float32 (ONNX data type ${weight.dataType})`;
  if (n.opType !== 'Gemm') return null;
  if (attrInt(n, 'transA') === 1) return 'Gemm with transA';
  const alpha = floatAttrOf(n, 'alpha');
  const beta = floatAttrOf(n, 'beta');
  if ((alpha ?? 1) !== 1 || (n.input?.[2] && (beta ?? 1) !== 1)) return 'Gemm with alpha or beta other than 1';
  return null;
}

interface LinearParts {
  scope: string;
  /** The float input the linear reads. */
  input: string;
  /** The tensor its product goes to (before any bias Add). */
  output: string;
  K: number;
  N: number;
  /** W[n, k]: output feature n, input feature k. */
  weightAt: (n: number, k: number) => number;
}

/** MatMulNBits over the weight quantized block-wise, named `<scope>/MatMulNBits`. */
function nbitsLinear(g: GraphEditor, p: LinearParts & { site: LinearSite; opts: QuantizeOptions }): { nodes: NodeProto[]; bytes: number } {
  const { K, N, opts } = p;
  const q = quantizeBlockwise(p.weightAt, N, K, opts.bits, opts.blockSize);
  const prefix = `${p.site.name}.weight_q${opts.bits}`;
  const u8 = (name: string, bytes: Uint8Array, dims: number[]): TensorProto => ({ name, dataType: DataType.UINT8, dims, rawData: bytes });
  g.initializer(u8(prefix, q.packed, [N, blocksPerRow(K, opts.blockSize), blobSize(opts.blockSize, opts.bits)]));
  g.initializer(floatTensor(`${prefix}.scales`, q.scales, [q.scales.length]));
  g.initializer(u8(`${prefix}.zero_points`, q.zeroPoints, [q.zeroPoints.length]));
  const node: NodeProto = {
    name: `${p.scope}/MatMulNBits`, opType: 'MatMulNBits', domain: MS_DOMAIN,
    input: [p.input, prefix, `${prefix}.scales`, `${prefix}.zero_points`],
    output: [p.output],
    attribute: [
      attribute('K', K), attribute('N', N), attribute('bits', opts.bits), attribute('block_size', opts.blockSize),
      attribute('accuracy_level', opts.accuracyLevel ?? 0),
    ],
  };
  return { nodes: [node], bytes: quantizedBytes(q) };
}

/**
 * onnxruntime's QOpMatMul/MatMulInteger layout (operators/matmul.py), names
 * and all: the linear is a MatMul `<scope>/MatMul` (a Gemm becomes MatMul + Add),
 * quantized as `<scope>/MatMul_quant` reading `<input>_quantized`,
 * `<weight>_quantized`, `<input>_zero_point`, `<weight>_zero_point`, writing
 * `<output>_output_quantized`, cast to float by `<output>_output_quantized_cast`,
 * times the scales' product `<scope>/MatMul_quant_scales_mul:0`.
 */
function integerLinear(
  g: GraphEditor,
  p: LinearParts & { weight: string; dqlOf: Map<string, string[]>; opts: IntegerWeightOptions },
): { nodes: NodeProto[]; bytes: number } {
  const { K, N } = p;
  const q = quantizeInteger((k, n) => p.weightAt(n, k), K, N, p.opts);
  const type = p.opts.weightType === 'int8' ? DataType.INT8 : DataType.UINT8;
  const bytesOf = (a: Int8Array | Uint8Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  g.initializer({ name: `${p.weight}_quantized`, dataType: type, dims: [K, N], rawData: bytesOf(q.codes) });
  // Per-tensor parameters are scalars, per-channel ones [N] (base_quantizer.quantize_weight_per_channel_impl).
  const paramDims = p.opts.perChannel ? [N] : [];
  g.initializer({ ...floatTensor(`${p.weight}_scale`, q.scales, paramDims), dims: paramDims });
  g.initializer({ name: `${p.weight}_zero_point`, dataType: type, dims: paramDims, rawData: bytesOf(q.zeroPoints) });
  const nodes: NodeProto[] = [];
  let dq = p.dqlOf.get(p.input);
  if (!dq) {
    dq = [`${p.input}_quantized`, `${p.input}_scale`, `${p.input}_zero_point`];
    p.dqlOf.set(p.input, dq);
    nodes.push({ name: `${p.input}_QuantizeLinear`, opType: 'DynamicQuantizeLinear', input: [p.input], output: dq });
  }
  const name = `${p.scope}/MatMul_quant`;
  const product = `${p.output}_output_quantized`;
  nodes.push(
    { name, opType: 'MatMulInteger', input: [dq[0], `${p.weight}_quantized`, dq[2], `${p.weight}_zero_point`], output: [product] },
    { name: `${product}_cast`, opType: 'Cast', input: [product], output: [`${product}_cast_output`], attribute: [attribute('to', DataType.FLOAT)] },
    { name: `${name}_scales_mul`, opType: 'Mul', input: [dq[1], `${p.weight}_scale`], output: [`${name}_scales_mul:0`] },
    { name: `${name}_output_scale_mul`, opType: 'Mul', input: [`${product}_cast_output`, `${name}_scales_mul:0`], output: [p.output] },
  );
  return { nodes, bytes: q.codes.byteLength + q.scales.byteLength + q.zeroPoints.byteLength };
}

/** Rewrites `model` (its external data under `baseDir`) with quantized linears; returns the new model, self-contained. */
export function quantizeModel(model: ModelProto, baseDir: string, opts: QuantizeOptions): { model: ModelProto; report: QuantizeReport } {
  const g = new GraphEditor(model);
  const integer = opts.format === 'integer' ? (opts.integer ?? INTEGER_DEFAULTS) : null;
  if (integer && opts.bits !== 8) throw new Error(`the integer format (MatMulInteger) is 8-bit only, not ${opts.bits}-bit: use --bits 8, or --format nbits for ${opts.bits}-bit`);
  // quantize_dynamic quantizes a tensor read by several linears (q, k and v) once: one DynamicQuantizeLinear each.
  const dqlOf = new Map<string, string[]>();
  const report: QuantizeReport = { quantized: [], skipped: [], floatBytes: 0, quantizedBytes: 0 };
  const weights = new Map((model.graph!.initializer ?? []).map((t) => [t.name!, t]));
  for (const site of findLinearModules(model.graph!)) {
    if (isLmHead(site.name) && !opts.includeLmHead) {
      report.skipped.push({ module: site.name, reason: 'kept float by default; --include-lm-head quantizes it' });
      continue;
    }
    if (site.quantization) {
      report.skipped.push({ module: site.name, reason: `already ${site.quantization.format} ${site.quantization.bits}-bit` });
      continue;
    }
    const src = site.node;
    const w = weights.get(src.input![1])!;
    const why = unsupported(site, w);
    if (why) {
      report.skipped.push({ module: site.name, reason: why });
      continue;
    }
    const data = floatData(w, baseDir);
    const d1 = dimsOf(w)[1];
    const K = site.inFeatures;
    const N = site.outFeatures;
    // MatMul and Gemm keep W as [in, out]; Gemm with transB as [out, in] (a tied lm_head reading the embedding).
    const transB = src.opType === 'Gemm' && attrInt(src, 'transB') === 1;
    const weightAt = transB ? (n: number, k: number) => data[n * d1 + k] : (n: number, k: number) => data[k * d1 + n];
    const scope = src.name!.slice(0, src.name!.lastIndexOf('/'));
    const bias = src.opType === 'Gemm' ? src.input?.[2] : undefined;
    const out = src.output![0];
    // A Gemm's bias becomes its own Add, as an ORT-optimised Linear has it: BitFit reads the bias there.
    const linearOut = bias ? `${scope}/${integer ? 'MatMul' : 'MatMulNBits'}_output_0` : out;
    const { nodes, bytes } = integer
      ? integerLinear(g, { scope, input: src.input![0], weight: transB ? `${w.name}_transposed` : w.name!, output: linearOut, K, N, weightAt, dqlOf, opts: integer })
      : nbitsLinear(g, { site, scope, input: src.input![0], output: linearOut, K, N, weightAt, opts });
    const at = g.nodes.findIndex((n) => n.output?.[0] === out);
    const replacement = bias ? [...nodes, { name: `${scope}/Add`, opType: 'Add', input: [linearOut, bias], output: [out] }] : nodes;
    g.nodes.splice(at, 1, ...replacement);
    report.quantized.push(site.name);
    report.floatBytes += N * K * 4;
    report.quantizedBytes += bytes;
  }
  g.pruneDead();
  g.sortTopologically();
  // Weights that stay float (embeddings, lm_head, norms) are written inline: a quantized model is small.
  const initializer = g.initializers.map((t) =>
    t.dataLocation === onnx.TensorProto.DataLocation.EXTERNAL
      ? { ...t, rawData: tensorBytes(t, baseDir), dataLocation: onnx.TensorProto.DataLocation.DEFAULT, externalData: [] }
      : t);
  // MatMulInteger and DynamicQuantizeLinear are standard ONNX ops (opset 10 and 11); only MatMulNBits needs the contrib domain.
  const opsetImport = integer ? model.opsetImport ?? [] : [...(model.opsetImport ?? []).filter((o) => o.domain !== MS_DOMAIN), { domain: MS_DOMAIN, version: 1 }];
  const metadataProps = [
    ...(model.metadataProps ?? []).filter((p) => p.key !== 'deltaserve.quantization'),
    {
      key: 'deltaserve.quantization',
      value: JSON.stringify(integer
        ? { format: 'MatMulInteger', bits: 8, weight_type: integer.weightType, per_channel: integer.perChannel, reduce_range: integer.reduceRange, activations: 'DynamicQuantizeLinear', method: "onnxruntime quantize_dynamic's" }
        : { format: 'MatMulNBits', bits: opts.bits, block_size: opts.blockSize, method: 'round-to-nearest, asymmetric, per block' }),
    },
  ];
  const graph = { ...g.graph(model.graph?.name ?? 'main'), initializer };
  return { model: onnx.ModelProto.create({ ...model, opsetImport, metadataProps, graph }), report };
}

/** Writes a quantized copy of the model directory `dir` (Optimum's layout) to `out`: model.onnx and every other file as it was. */
export async function quantizeModelDir(dir: string, out: string, opts: QuantizeOptions): Promise<QuantizeReport> {
  if (resolve(dir) === resolve(out)) throw new Error(`--out must be another folder than the model's own (${dir}): the copy would overwrite its source`);
  const source = readModelDir(dir);
  const { model, report } = quantizeModel(source.model, dir, opts);
  if (!report.quantized.length) throw new Error(`no linear module of ${dir} could be quantized: ${report.skipped.map((s) => `${s.module} (${s.reason})`).join(', ') || 'none found'}`);
  const bytes = (model.graph!.initializer ?? []).reduce((a, t) => a + (t.rawData?.length ?? 0), 0);
  // protobuf cannot hold more; writing external data for quantized models is not built.
  if (bytes > PROTOBUF_LIMIT) {
    throw new Error(`the quantized model would hold ${(bytes / 2 ** 30).toFixed(2)} GiB of weights in model.onnx, past protobuf's 2 GiB: ` +
      'deltaserve quantize writes self-contained models only; quantize with fewer bits or use a smaller model');
  }
  await mkdir(out, { recursive: true });
  const external = new Set(source.externalFiles);
  for (const e of await readdir(dir, { withFileTypes: true })) {
    if (!e.isFile() || e.name === 'model.onnx' || external.has(e.name) || e.name.startsWith('.')) continue;
    await copyFile(join(dir, e.name), join(out, e.name));
  }
  await writeFile(join(out, 'model.onnx'), encodeModel(model));
  return report;
}
