/** Section 15 (issue 10): bytes crossing between host and device per decode step, by device (cpu, host-fed cuda, webgpu). */
import { loadBackbone } from '../../src/backbone/backbone.js';
import { deviceStepTable, measureDeviceStep } from '../lib/device-step.js';
import type { BenchSection } from '../lib/runner.js';

const TITLE = '15. Bytes crossing per decode step, by device (issue 10)';

export const section: BenchSection = {
  name: 'device',
  async run(ctx) {
    const log = ctx.log;
    // Context 512 through a 500-token PREFIX_TUNING delta (its K/V uploaded once, no model compute) and a 4-token prompt, which a
    // software rasterizer gets through (minutes per 512-token prefill of gpt2-small on lavapipe here); 4 of 32 rows sample in a
    // second configuration. Every device runs gpt2-small at batch 1 and 32 (on lavapipe: ~5 minutes a batch-32 configuration,
    // ~10 GB resident, since a prefill group's rows join the device cache in one run). The prompt-prefilled rows (260 tokens through
    // the model) check that the bytes do not depend on how the context was reached; their batch-32 prefill through the model would
    // take the better part of an hour on lavapipe, so webgpu runs them at batch 32 only on a GPU host (scripts/gpu-check.sh,
    // DELTASERVE_BENCH_GPU=1).
    // --quick: demo:gpt2 at context 64 (a 50-token prefix), a smoke run of the path, as gpu-check.sh's lavapipe mode makes.
    const gpuHost = process.env.DELTASERVE_BENCH_GPU === '1';
    const all = ['cpu', 'cuda', 'webgpu'] as const;
    const tiny = () => loadBackbone({ model: 'demo:gpt2', cacheDir: ctx.cacheDir });
    const prefix = { virtualTokens: 500, promptTokens: 4 };
    const results = ctx.quick
      ? [await measureDeviceStep(await tiny(), {
        batches: [1, 32], ctx: 64, steps: 3, devices: [...all], log, prefix: { virtualTokens: 50, promptTokens: 4 }, sampling: [0, 4],
      })]
      : [
        await measureDeviceStep(await ctx.backbone(), { batches: [1, 32], ctx: 512, steps: 3, devices: [...all], log, prefix, sampling: [0, 4] }),
        await measureDeviceStep(await ctx.backbone(), { batches: [1, 32], ctx: 512, steps: 5, devices: gpuHost ? [...all] : ['cpu', 'cuda'], log }),
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
