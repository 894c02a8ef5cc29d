/**
 * `deltaserve quantize`: a quantized copy of a float export. Every linear
 * module's MatMul/Gemm becomes onnxruntime's MatMulNBits over its weight
 * quantized block-wise (matmul-nbits.ts), in the same node scope, so module
 * names, delta sites and PEFT targets stay what they were. Embeddings (Gather)
 * are not linears and stay float; `lm_head` stays float unless asked.
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
import { blobSize, blocksPerRow, quantizeBlockwise, quantizedBytes, type Bits } from './matmul-nbits.js';

export const MS_DOMAIN = 'com.microsoft';
const PROTOBUF_LIMIT = 2 ** 31 - 2 ** 24;

export interface QuantizeOptions {
  bits: Bits;
  blockSize: number;
  /** Quantize lm_head too (off by default: the logits are the most sensitive product of the model). */
  includeLmHead?: boolean;
  /**
   * MatMulNBits' accuracy_level: 0 lets onnxruntime compute in float32 on
   * dequantized blocks; 4 lets it quantize activations to int8 on the fly
   * (faster on CPUs with int8 dot products, less exact).
   */
  accuracyLevel?: number;
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

/** Rewrites `model` (its external data under `baseDir`) with quantized linears; returns the new model, self-contained. */
export function quantizeModel(model: ModelProto, baseDir: string, opts: QuantizeOptions): { model: ModelProto; report: QuantizeReport } {
  const g = new GraphEditor(model);
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
    const q = quantizeBlockwise(transB ? (n, k) => data[n * d1 + k] : (n, k) => data[k * d1 + n], N, K, opts.bits, opts.blockSize);
    const prefix = `${site.name}.weight_q${opts.bits}`;
    const u8 = (name: string, bytes: Uint8Array, dims: number[]): TensorProto => ({ name, dataType: DataType.UINT8, dims, rawData: bytes });
    g.initializer(u8(prefix, q.packed, [N, blocksPerRow(K, opts.blockSize), blobSize(opts.blockSize, opts.bits)]));
    g.initializer(floatTensor(`${prefix}.scales`, q.scales, [q.scales.length]));
    g.initializer(u8(`${prefix}.zero_points`, q.zeroPoints, [q.zeroPoints.length]));
    const scope = src.name!.slice(0, src.name!.lastIndexOf('/'));
    const bias = src.opType === 'Gemm' ? src.input?.[2] : undefined;
    const out = src.output![0];
    const nbits: NodeProto = {
      name: `${scope}/MatMulNBits`, opType: 'MatMulNBits', domain: MS_DOMAIN,
      input: [src.input![0], prefix, `${prefix}.scales`, `${prefix}.zero_points`],
      output: [bias ? `${scope}/MatMulNBits_output_0` : out],
      attribute: [
        attribute('K', K), attribute('N', N), attribute('bits', opts.bits), attribute('block_size', opts.blockSize),
        attribute('accuracy_level', opts.accuracyLevel ?? 0),
      ],
    };
    const at = g.nodes.findIndex((n) => n.output?.[0] === out);
    // A Gemm's bias becomes its own Add, as an ORT-optimised Linear has it: BitFit reads the bias there.
    const replacement = bias ? [nbits, { name: `${scope}/Add`, opType: 'Add', input: [nbits.output![0], bias], output: [out] }] : [nbits];
    g.nodes.splice(at, 1, ...replacement);
    report.quantized.push(site.name);
    report.floatBytes += N * K * 4;
    report.quantizedBytes += quantizedBytes(q);
  }
  g.pruneDead();
  g.sortTopologically();
  // Weights that stay float (embeddings, lm_head, norms) are written inline: a quantized model is small.
  const initializer = g.initializers.map((t) =>
    t.dataLocation === onnx.TensorProto.DataLocation.EXTERNAL
      ? { ...t, rawData: tensorBytes(t, baseDir), dataLocation: onnx.TensorProto.DataLocation.DEFAULT, externalData: [] }
      : t);
  const opsetImport = [...(model.opsetImport ?? []).filter((o) => o.domain !== MS_DOMAIN), { domain: MS_DOMAIN, version: 1 }];
  const metadataProps = [
    ...(model.metadataProps ?? []).filter((p) => p.key !== 'deltaserve.quantization'),
    { key: 'deltaserve.quantization', value: JSON.stringify({ format: 'MatMulNBits', bits: opts.bits, block_size: opts.blockSize, method: 'round-to-nearest, asymmetric, per block' }) },
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
