/** Section 15 (issue 10): bytes crossing between host and device per decode step, by device (cpu, host-fed cuda, webgpu). */
import { loadBackbone } from '../../src/backbone/backbone.js';
import { deviceStepTable, measureDeviceStep } from '../lib/device-step.js';
import type { BenchSection } from '../lib/runner.js';

const TITLE = '15. Bytes crossing per decode step, by device (issue 10)';

export const section: BenchSection = {
  name: 'device',
  async run(ctx) {
    const log = ctx.log;
    // Batch 32 at context 512 on gpt2-small: the rows reach ~504 cached tokens through a 500-token PREFIX_TUNING delta (its K/V
    // uploaded once, no model compute) and a 4-token prompt, which lavapipe (a software rasterizer: minutes per 512-token
    // prefill here) gets through; 4 of the 32 rows sample in a second configuration. The prompt-prefilled rows beside them
    // (260 tokens through the model) check that the bytes do not depend on how the context was reached; on lavapipe
    // webgpu runs those at batch 1 only, on a GPU host (scripts/gpu-check.sh) at 32 too.
    // --quick: the same on demo:gpt2 at context 64 (a 50-token prefix), a smoke run of the path, as gpu-check.sh's lavapipe mode makes.
    const gpuHost = process.env.DELTASERVE_BENCH_GPU === '1';
    const all = ['cpu', 'cuda', 'webgpu'] as const;
    const results = ctx.quick
      ? [await measureDeviceStep(await loadBackbone({ model: 'demo:gpt2', cacheDir: ctx.cacheDir }), {
        batches: [1, 32], ctx: 64, steps: 3, devices: [...all], log, prefix: { virtualTokens: 50, promptTokens: 4 }, sampling: [0, 4],
      })]
      : [
        await measureDeviceStep(await ctx.backbone(), {
          batches: [1, 32], ctx: 512, steps: 3, devices: [...all], log, prefix: { virtualTokens: 500, promptTokens: 4 }, sampling: [0, 4],
        }),
        await measureDeviceStep(await ctx.backbone(), { batches: [1, 32], ctx: 512, steps: 3, devices: gpuHost ? [...all] : ['cpu', 'cuda'], log }),
        ...(gpuHost ? [] : [await measureDeviceStep(await ctx.backbone(), { batches: [1], ctx: 512, steps: 3, devices: ['webgpu'], log })]),
      ];
    return {
      goals: [],
      outputs: [{
        title: TITLE,
        body: [
          'The real Engine stepped at the KV capacity shown, decode-only steps (every row decoding, no prefill), medians; bytes from the ' +
          'engine\'s own counter (`deltaserve_engine_transfer_bytes_total`). The rows reached the context either through a PEFT PREFIX_TUNING ' +
          'delta of hundreds of virtual tokens (its K/V uploaded into the cache once, at the prefill, no model compute) and a short prompt, ' +
          'or through a prompt of just over half the capacity prefilled by the model. Sampling rows: the first rows of the batch sample ' +
          '(temperature 1), the rest are greedy; a sampling row\'s logits come back to the host. cuda is host-fed: its bytes are what its ' +
          'counter records, taken on the CPU provider because no CUDA ran here. webgpu ran on Mesa\'s lavapipe, a software Vulkan rasterizer ' +
          'on this shared 2-core CPU: its times say nothing about a GPU\'s.',
          deviceStepTable(results),
        ].join('\n\n'),
      }],
    };
  },
};
