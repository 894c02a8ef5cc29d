/**
 * What the rest of the server knows about a backbone: its linear modules as
 * PEFT and OpenDelta name them, and a fingerprint of that structure.
 */
export type Family = 'llama' | 'gpt2' | string;

export interface LinearModule {
  /** Module path as PEFT writes it: `model.layers.0.self_attn.q_proj`, `transformer.h.0.attn.c_attn`. */
  name: string;
  kind: 'linear';
  inFeatures: number;
  outFeatures: number;
  /** Layer index parsed from the path (`layers.3`, `h.3`), for `layers_to_transform`. */
  layer: number | null;
  /** Name of the graph initializer holding this module's bias, if it has one. */
  biasInitializer: string | null;
  /** How its weight is stored when it is not float: the op and its bits (deltas on it stay float32). */
  quantization?: Quantization;
}

/** A quantized linear's storage: onnxruntime's MatMulNBits (bits, block size along the input features), or MatMulInteger. */
export type Quantization = NBitsQuantization | IntegerQuantization;

export interface NBitsQuantization {
  format: 'MatMulNBits';
  bits: number;
  blockSize: number;
}

/**
 * ONNX MatMulInteger on 8-bit weights behind a DynamicQuantizeLinear of its
 * input, as onnxruntime's `quantize_dynamic` writes it (onnx-community's
 * `model_quantized.onnx`): the activations are quantized to uint8 at run time,
 * over the whole tensor, with one scale and zero point per step.
 */
export interface IntegerQuantization {
  format: 'MatMulInteger';
  bits: 8;
  /** The weight's type: int8 (symmetric) or uint8. */
  weightType: 'int8' | 'uint8';
  /** One scale and zero point per output feature, or one for the whole weight. */
  perChannel: boolean;
  activations: 'dynamic';
}

export interface BackboneInfo {
  /** The backbone's own name; a request naming it runs without a delta. */
  name: string;
  family: Family;
  /** sha256 over the module names and shapes: a delta records it when registered. */
  fingerprint: string;
  modules: LinearModule[];
  /** Default target module suffixes per delta kind, like OpenDelta's default configurations. */
  defaultTargets: Record<string, string[]>;
  hiddenSize: number;
  numLayers: number;
  /** K/V heads per layer and their size (grouped-query models have fewer K/V heads than query heads). */
  kvHeads?: number;
  headDim?: number;
  vocabSize: number;
  maxPositions: number;
  /** The backbone's bias values for a module (BitFit stores tuned biases; the delta is the difference). */
  biasOf(module: string): Float32Array | null;
}
