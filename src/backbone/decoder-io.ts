/**
 * Discovers a decoder's I/O from the graph itself, the way Optimum's
 * `text-generation-with-past` export lays it out.
 */
import { DataType, shapeOf, type GraphProto } from './onnx/proto.js';

export interface DecoderIO {
  layers: number;
  kvHeads: number;
  headDim: number;
  hasPositionIds: boolean;
  vocabSize: number;
  /** The KV cache is float16 in the graph (a float16 export); the engine's graph casts at its edges. */
  float16: boolean;
}

const EXPORT_HINT = 'export it with `optimum-cli export onnx --model <model> --task text-generation-with-past <dir>`';

export class ModelFormatError extends Error {
  override name = 'ModelFormatError';
}

function num(v: unknown): number | null {
  return typeof v === 'number' && Number.isFinite(v) ? v : null;
}

export function discoverDecoderIO(graph: GraphProto, config: Record<string, unknown>): DecoderIO {
  const inputs = new Map((graph.input ?? []).map((v) => [v.name!, v]));
  const outputs = new Map((graph.output ?? []).map((v) => [v.name!, v]));
  const missing: string[] = [];
  for (const name of ['input_ids', 'attention_mask']) if (!inputs.has(name)) missing.push(`input ${name}`);
  if (!outputs.has('logits')) missing.push('output logits');
  const pastKeys = [...inputs.keys()].filter((n) => /^past_key_values\.\d+\.key$/.test(n));
  if (pastKeys.length === 0) missing.push('inputs past_key_values.N.key/value (the KV cache)');
  if (missing.length) {
    throw new ModelFormatError(
      `model.onnx is not a decoder with KV-cache I/O: missing ${missing.join(', ')}; ${EXPORT_HINT}`,
    );
  }
  const layers = pastKeys.length;
  for (let i = 0; i < layers; i++) {
    for (const kv of ['key', 'value']) {
      if (!inputs.has(`past_key_values.${i}.${kv}`)) missing.push(`input past_key_values.${i}.${kv}`);
      if (!outputs.has(`present.${i}.${kv}`)) missing.push(`output present.${i}.${kv}`);
    }
  }
  if (missing.length) throw new ModelFormatError(`model.onnx has an incomplete KV cache: missing ${missing.join(', ')}; ${EXPORT_HINT}`);

  const pastShape = shapeOf(inputs.get('past_key_values.0.key')!);
  const heads = num(config.num_attention_heads) ?? num(config.n_head);
  const hidden = num(config.hidden_size) ?? num(config.n_embd);
  const kvHeads = typeof pastShape[1] === 'number' ? pastShape[1] : num(config.num_key_value_heads) ?? heads;
  const headDim =
    typeof pastShape[3] === 'number' ? pastShape[3] : num(config.head_dim) ?? (hidden && heads ? hidden / heads : null);
  if (!kvHeads || !headDim) {
    throw new ModelFormatError('cannot tell the KV heads and head size: neither the past_key_values shapes nor config.json give them');
  }
  const logitsShape = shapeOf(outputs.get('logits')!);
  const vocabSize = typeof logitsShape[2] === 'number' ? logitsShape[2] : num(config.vocab_size);
  if (!vocabSize) throw new ModelFormatError('cannot tell the vocabulary size: set vocab_size in config.json');
  const float16 = inputs.get('past_key_values.0.key')!.type?.tensorType?.elemType === DataType.FLOAT16;
  return { layers, kvHeads, headDim, hasPositionIds: inputs.has('position_ids'), vocabSize, float16 };
}
