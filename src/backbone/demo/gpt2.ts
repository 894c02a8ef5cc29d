/** GPT-2 as torch.onnx exports it through Optimum (`transformer.h.N.attn.c_attn` …). */
import { DataType, GraphBuilder } from '../onnx/graph-builder.js';
import { geluNew } from '../onnx/activations.js';
import { floatAttr } from '../onnx/proto.js';
import { headDim, type DemoSpec } from './spec.js';
import {
  attention, attentionBias, conv1dGemm, decoderInputs, layerNorm, splitHeads, type BuildHooks, type WeightSource,
} from './layers.js';

export function buildGpt2(spec: DemoSpec, weights: WeightSource, hooks: BuildHooks = {}): GraphBuilder {
  const g = new GraphBuilder();
  const D = headDim(spec);
  const H = spec.hidden;
  const { inputIds, attentionMask, positionIds, past } = decoderInputs(g, spec.layers, spec.kvHeads, D);

  const wte = g.weight('transformer.wte.weight', weights('transformer.wte.weight', spec.vocabSize * H, 'embedding'), [spec.vocabSize, H]);
  const wpe = g.weight('transformer.wpe.weight', weights('transformer.wpe.weight', spec.maxPositions * H, 'embedding'), [spec.maxPositions, H]);
  const tok = g.scope('/transformer/wte', () => g.op('Gather', [wte, inputIds]));
  const pos = g.scope('/transformer/wpe', () => g.op('Gather', [wpe, positionIds]));
  let h = g.scope('/transformer', () => g.op('Add', [tok, pos]));
  const bias = g.scope('/transformer', () => attentionBias(g, inputIds, attentionMask));

  for (let i = 0; i < spec.layers; i++) {
    const p = `transformer.h.${i}`;
    const x = layerNorm(g, `${p}.ln_1`, h, H, spec.eps, weights);
    const attnOut = g.scope(`/transformer/h.${i}/attn`, () => {
      const qkv = conv1dGemm(g, `${p}.attn.c_attn`, x, H, 3 * H, weights, hooks);
      const [q, k, v] = g.nodeN('Split', [qkv, g.ints([H, H, H])], 3, { axis: 2 });
      const ctx = attention(
        g, splitHeads(g, q, spec.heads, D), splitHeads(g, k, spec.heads, D), splitHeads(g, v, spec.heads, D),
        past[i].key, past[i].value, bias, spec.heads, spec.kvHeads, D,
        { key: `present.${i}.key`, value: `present.${i}.value` },
      );
      return ctx;
    });
    const proj = conv1dGemm(g, `${p}.attn.c_proj`, attnOut, H, H, weights, hooks);
    h = g.scope(`/transformer/h.${i}`, () => g.op('Add', [h, proj]));
    const x2 = layerNorm(g, `${p}.ln_2`, h, H, spec.eps, weights);
    const fc = conv1dGemm(g, `${p}.mlp.c_fc`, x2, H, spec.intermediate, weights, hooks);
    const act = g.scope(`/transformer/h.${i}/mlp/act`, () => geluNew(g, fc));
    const down = conv1dGemm(g, `${p}.mlp.c_proj`, act, spec.intermediate, H, weights, hooks);
    h = g.scope(`/transformer/h.${i}`, () => g.op('Add', [h, down]));
  }
  const hf = layerNorm(g, 'transformer.ln_f', h, H, spec.eps, weights);
  // The tied lm_head shares wte; a Gemm with transB reads it in place.
  g.scope('/lm_head', () => {
    const shape = g.op('Shape', [hf]);
    const outShape = g.op('Concat', [g.op('Slice', [shape, g.ints([0]), g.ints([2]), g.ints([0])]), g.ints([spec.vocabSize])], { axis: 0 });
    const x2 = g.op('Reshape', [hf, g.ints([-1, H])]);
    const y = g.op('Gemm', [x2, wte], { transB: 1, alpha: floatAttr('alpha', 1) });
    g.opNamed('Reshape', [y, outShape], 'logits');
  });
  g.output('logits', DataType.FLOAT, ['batch_size', 'sequence_length', spec.vocabSize]);
  for (let i = 0; i < spec.layers; i++) {
    for (const kv of ['key', 'value']) {
      g.output(`present.${i}.${kv}`, DataType.FLOAT, ['batch_size', spec.kvHeads, 'past_sequence_length + sequence_length', D]);
    }
  }
  return g;
}
