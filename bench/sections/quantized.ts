/** Section 14 (issue 17): decode steps on float32, 8-bit and 4-bit copies of demo:gpt2-small, bare and with 32 LoRAs, and RSS. */
import { measureQuantized, quantizedGoals, quantizedTables } from '../lib/quantized-step.js';
import type { BenchSection } from '../lib/runner.js';

export const section: BenchSection = {
  name: 'quantized',
  async run(ctx) {
    const q = ctx.quick;
    const res = await measureQuantized(ctx.cacheDir, { model: ctx.model, rounds: q ? 2 : 5, perBlock: q ? 3 : 6, context: 64, batches: [1, 8, 32], log: ctx.log });
    return {
      goals: quantizedGoals(res),
      outputs: [{
        title: '14. Quantized backbones: float32, 8-bit, 4-bit, bare and with 32 LoRAs (issue 17)',
        body: [
          `${ctx.model} and its copies` + ' written by `deltaserve quantize` (MatMulNBits, round-to-nearest per block of 32; embeddings float; lm_head float unless said; ' +
          '"int8 activations" = `--accuracy-level 4`, MatMulNBits quantizing its input per block on the fly), ' +
          'each loaded as the server loads it, its engine graph on the default site plan; the LoRAs are full-precision r16 on every c_attn (at B=1 one LoRA, at B=8 eight).',
          quantizedTables(res),
        ].join('\n\n'),
      }],
    };
  },
};
