/**
 * The backbone's module tree, recovered from the exporter's node scopes: which
 * linear modules exist, their shapes and their bias, named as PEFT and
 * OpenDelta name them.
 */
import { createHash } from 'node:crypto';
import { GraphIndex, modulePathOf } from './onnx/graph-index.js';
import { attrInt, DataType, dimsOf, floatData, type GraphProto, type NodeProto } from './onnx/proto.js';
import { matmulIntegerChain } from './quant/matmul-integer.js';
import type { LinearModule, Quantization } from './types.js';

export interface LinearSite extends LinearModule {
  /** The MatMul, Gemm, MatMulNBits or MatMulInteger computing `x · W`. */
  node: NodeProto;
  /** The float tensor the module reads: the op's input, or what a DynamicQuantizeLinear quantizes for it. */
  input: string;
  /** A MatMulInteger's activation quantization: the DynamicQuantizeLinear and the Mul taking its scale. */
  dynamic?: { quantize: NodeProto; scalesMul: NodeProto };
  /** The tensor carrying the module's full output (after its bias Add when the bias is a separate node). */
  output: string;
  /**
   * Gemm nodes see a 2-D view [batch*seq, in] of the input; null where the op
   * takes either rank (a quantized linear replacing a Gemm keeps its 2-D view,
   * one replacing a MatMul its 3-D input) and the sites go by the tensor's own shape.
   */
  twoD: boolean | null;
}

function layerOf(path: string): number | null {
  const m = /(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)(?:\.|$)/.exec(path);
  return m ? Number(m[1]) : null;
}

/**
 * Finds every MatMul/Gemm against a 2-D weight initializer, every MatMulNBits,
 * and every MatMulInteger in quantize_dynamic's layout, and names it by its scope.
 */
export function findLinearModules(graph: GraphProto): LinearSite[] {
  const index = new GraphIndex(graph);
  const found: LinearSite[] = [];
  const seen = new Set<string>();
  for (const node of graph.node ?? []) {
    const shape = node.opType === 'MatMulNBits' ? nbitsShape(node, index) : node.opType === 'MatMulInteger' ? integerShape(node, index) : floatShape(node, index);
    if (!shape) continue;
    const name = modulePathOf(node.name ?? '');
    if (!name || seen.has(name)) continue;
    const { inFeatures, outFeatures, quantization, dynamic } = shape;
    let biasInitializer: string | null = null;
    let output = shape.output ?? node.output![0];
    // Gemm's C, or MatMulNBits' optional bias (input 5).
    const biasInput = node.opType === 'Gemm' ? node.input?.[2] : node.opType === 'MatMulNBits' ? node.input?.[5] : undefined;
    if (biasInput && index.initializers.has(biasInput)) {
      biasInitializer = biasInput;
    } else {
      // An ORT-optimised or folded Linear: MatMul followed by Add of a 1-D initializer.
      const next = index.consumersOf(output);
      if (next.length === 1 && next[0].opType === 'Add') {
        const other = next[0].input!.find((i) => i !== output)!;
        const b = index.initializers.get(other);
        if (b && dimsOf(b).length === 1 && dimsOf(b)[0] === outFeatures) {
          biasInitializer = other;
          output = next[0].output![0];
        }
      }
    }
    seen.add(name);
    found.push({
      name, kind: 'linear', inFeatures, outFeatures, layer: layerOf(name), biasInitializer,
      node, output, twoD: quantization ? null : node.opType === 'Gemm',
      input: dynamic ? dynamic.quantize.input![0] : node.input![0],
      ...(quantization ? { quantization } : {}),
      ...(dynamic ? { dynamic } : {}),
    });
  }
  return found;
}

interface LinearShape {
  inFeatures: number;
  outFeatures: number;
  quantization?: Quantization;
  /** Where the product leaves the op's chain, when that is not the op's own output. */
  output?: string;
  dynamic?: LinearSite['dynamic'];
}

/** A MatMul/Gemm against a 2-D float weight initializer. */
function floatShape(node: NodeProto, index: GraphIndex): LinearShape | null {
  if (node.opType !== 'MatMul' && node.opType !== 'Gemm') return null;
  const weight = index.initializers.get(node.input?.[1] ?? '');
  if (!weight || dimsOf(weight).length !== 2) return null;
  const [d0, d1] = dimsOf(weight);
  const transB = node.opType === 'Gemm' && attrInt(node, 'transB') === 1;
  return { inFeatures: transB ? d1 : d0, outFeatures: transB ? d0 : d1 };
}

/** onnxruntime's MatMulNBits (com.microsoft) against a packed initializer: K inputs, N outputs. */
function nbitsShape(node: NodeProto, index: GraphIndex): LinearShape | null {
  if (node.domain !== 'com.microsoft' || !index.initializers.has(node.input?.[1] ?? '')) return null;
  const K = attrInt(node, 'K');
  const N = attrInt(node, 'N');
  const blockSize = attrInt(node, 'block_size');
  if (!K || !N || !blockSize) return null;
  return { inFeatures: K, outFeatures: N, quantization: { format: 'MatMulNBits', bits: attrInt(node, 'bits') ?? 4, blockSize } };
}

/**
 * ONNX MatMulInteger as onnxruntime's quantize_dynamic writes it (operators/matmul.py):
 * DynamicQuantizeLinear(x) → MatMulInteger(x_q, W_q [K, N] int8/uint8 initializer, x_zp, W_zp)
 * → Cast(float) → Mul by Mul(x_scale, W_scale). Anything else is not taken for a linear.
 */
function integerShape(node: NodeProto, index: GraphIndex): LinearShape | null {
  const weight = index.initializers.get(node.input?.[1] ?? '');
  if (!weight || dimsOf(weight).length !== 2 || (weight.dataType !== DataType.INT8 && weight.dataType !== DataType.UINT8)) return null;
  const quantize = index.producer.get(node.input![0]);
  if (quantize?.opType !== 'DynamicQuantizeLinear' || node.input?.[2] !== quantize.output?.[2]) return null;
  const chain = matmulIntegerChain(index, node, quantize.output![1]);
  if (!chain) return null;
  const { mul, scalesMul } = chain;
  const weightScale = index.initializers.get(chain.weightScale);
  const [K, N] = dimsOf(weight);
  return {
    inFeatures: K, outFeatures: N, output: mul.output![0], dynamic: { quantize, scalesMul },
    quantization: {
      format: 'MatMulInteger', bits: 8, weightType: weight.dataType === DataType.INT8 ? 'int8' : 'uint8',
      perChannel: !!weightScale && dimsOf(weightScale).some((d) => d > 1), activations: 'dynamic',
    },
  };
}

export function fingerprintOf(modules: LinearModule[]): string {
  const lines = modules.map((m) => `${m.name}:${m.inFeatures}:${m.outFeatures}`).sort();
  return createHash('sha256').update(lines.join('\n')).digest('hex');
}

/** Reads module biases on demand (BitFit needs them); `baseDir` holds any external data. */
export function biasReader(graph: GraphProto, baseDir: string) {
  const index = new GraphIndex(graph);
  return (initializer: string | null): Float32Array | null => {
    if (!initializer) return null;
    const t = index.initializers.get(initializer);
    return t ? floatData(t, baseDir) : null;
  };
}

/** Default targets per family and delta kind, as OpenDelta's default configurations (and PEFT's, for IA³) pick them. */
export function defaultTargetsFor(family: string): Record<string, string[]> {
  if (family === 'gpt2') {
    return { lora: ['c_attn'], adapter: ['attn.c_proj', 'mlp.c_proj'], bitfit: ['c_attn', 'c_proj', 'c_fc'], ia3: ['c_attn', 'mlp.c_proj'] };
  }
  return {
    lora: ['q_proj', 'v_proj'],
    adapter: ['self_attn.o_proj', 'mlp.down_proj'],
    bitfit: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
    ia3: ['k_proj', 'v_proj', 'down_proj'],
  };
}

export function familyOf(modelType: string | undefined, modules: LinearModule[]): string {
  if (modelType) return modelType;
  if (modules.some((m) => m.name.startsWith('transformer.h.'))) return 'gpt2';
  return 'llama';
}
