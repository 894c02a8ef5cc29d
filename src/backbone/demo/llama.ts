/** Llama as torch.onnx exports it through Optimum (`model.layers.N.self_attn.q_proj` …). */
import { silu } from '../onnx/activations.js';
import { DataType, GraphBuilder } from '../onnx/graph-builder.js';
import { headDim, type DemoSpec } from './spec.js';
import {
  attention, attentionBias, decoderInputs, linearMatMul, rmsNorm, splitHeads, type BuildHooks, type WeightSource,
} from './layers.js';

/** cos/sin [B, 1, S, D] from position ids, computed once for all layers. */
function rotaryTables(g: GraphBuilder, positionIds: string, D: number, theta: number) {
  const invFreq = Array.from({ length: D / 2 }, (_, i) => 1 / Math.pow(theta, (2 * i) / D));
  return g.scope('/model/rotary_emb', () => {
    const pos = g.op('Unsqueeze', [g.op('Cast', [positionIds], { to: DataType.FLOAT }), g.ints([-1])]);
    const freqs = g.op('Mul', [pos, g.floats(invFreq)]);
    const emb = g.op('Concat', [freqs, freqs], { axis: -1 });
    return {
      cos: g.op('Unsqueeze', [g.op('Cos', [emb]), g.ints([1])]),
      sin: g.op('Unsqueeze', [g.op('Sin', [emb]), g.ints([1])]),
    };
  });
}

function applyRotary(g: GraphBuilder, x: string, cos: string, sin: string, D: number): string {
  const x1 = g.op('Slice', [x, g.ints([0]), g.ints([D / 2]), g.ints([-1])]);
  const x2 = g.op('Slice', [x, g.ints([D / 2]), g.ints([D]), g.ints([-1])]);
  const rotated = g.op('Concat', [g.op('Neg', [x2]), x1], { axis: -1 });
  return g.op('Add', [g.op('Mul', [x, cos]), g.op('Mul', [rotated, sin])]);
}

export function buildLlama(spec: DemoSpec, weights: WeightSource, hooks: BuildHooks = {}): GraphBuilder {
  const g = new GraphBuilder();
  const D = headDim(spec);
  const H = spec.hidden;
  const kvDim = spec.kvHeads * D;
  const { inputIds, attentionMask, positionIds, past } = decoderInputs(g, spec.layers, spec.kvHeads, D);
  let matmulCount = 0;
  // torch names transposed Linear weights by the MatMul that consumes them.
  const wname = () => `onnx::MatMul_${1000 + matmulCount++}`;

  const emb = g.weight('model.embed_tokens.weight', weights('model.embed_tokens.weight', spec.vocabSize * H, 'embedding'), [spec.vocabSize, H]);
  let h = g.scope('/model/embed_tokens', () => g.op('Gather', [emb, inputIds]));
  const bias = g.scope('/model', () => attentionBias(g, inputIds, attentionMask));
  const { cos, sin } = rotaryTables(g, positionIds, D, spec.ropeTheta);

  for (let i = 0; i < spec.layers; i++) {
    const p = `model.layers.${i}`;
    const x = rmsNorm(g, `${p}.input_layernorm`, h, H, spec.eps, weights);
    const attnOut = g.scope(`/model/layers.${i}/self_attn`, () => {
      const q = linearMatMul(g, `${p}.self_attn.q_proj`, x, H, H, weights, hooks, wname());
      const k = linearMatMul(g, `${p}.self_attn.k_proj`, x, H, kvDim, weights, hooks, wname());
      const v = linearMatMul(g, `${p}.self_attn.v_proj`, x, H, kvDim, weights, hooks, wname());
      const qr = applyRotary(g, splitHeads(g, q, spec.heads, D), cos, sin, D);
      const kr = applyRotary(g, splitHeads(g, k, spec.kvHeads, D), cos, sin, D);
      const ctx = attention(
        g, qr, kr, splitHeads(g, v, spec.kvHeads, D), past[i].key, past[i].value, bias, spec.heads, spec.kvHeads, D,
        { key: `present.${i}.key`, value: `present.${i}.value` },
      );
      return linearMatMul(g, `${p}.self_attn.o_proj`, ctx, H, H, weights, hooks, wname());
    });
    h = g.scope(`/model/layers.${i}`, () => g.op('Add', [h, attnOut]));
    const x2 = rmsNorm(g, `${p}.post_attention_layernorm`, h, H, spec.eps, weights);
    const mlpOut = g.scope(`/model/layers.${i}/mlp`, () => {
      const gate = linearMatMul(g, `${p}.mlp.gate_proj`, x2, H, spec.intermediate, weights, hooks, wname());
      const up = linearMatMul(g, `${p}.mlp.up_proj`, x2, H, spec.intermediate, weights, hooks, wname());
      const act = g.scope(`/model/layers.${i}/mlp/act_fn`, () => silu(g, gate));
      return linearMatMul(g, `${p}.mlp.down_proj`, g.op('Mul', [act, up]), spec.intermediate, H, weights, hooks, wname());
    });
    h = g.scope(`/model/layers.${i}`, () => g.op('Add', [h, mlpOut]));
  }
  const hf = rmsNorm(g, 'model.norm', h, H, spec.eps, weights);
  const lm = g.weight(wname(), weights('lm_head.weight', H * spec.vocabSize, 'linear'), [H, spec.vocabSize]);
  g.scope('/lm_head', () => g.opNamed('MatMul', [hf, lm], 'logits'));
  g.output('logits', DataType.FLOAT, ['batch_size', 'sequence_length', spec.vocabSize]);
  for (let i = 0; i < spec.layers; i++) {
    for (const kv of ['key', 'value']) {
      g.output(`present.${i}.${kv}`, DataType.FLOAT, ['batch_size', spec.kvHeads, 'past_sequence_length + sequence_length', D]);
    }
  }
  return g;
}
