/** Section 15 (issue 10): bytes crossing between host and device per decode step, by device (cpu, host-fed cuda, webgpu). */
import { loadBackbone } from '../../src/backbone/backbone.js';
import { deviceStepTable, measureDeviceStep } from '../lib/device-step.js';
import type { BenchSection } from '../lib/runner.js';

const TITLE = '15. Bytes crossing per decode step, by device (issue 10)';

export const section: BenchSection = {
  name: 'device',
  async run(ctx) {
    const log = ctx.log;
    // On a GPU host (scripts/gpu-check.sh) webgpu runs gpt2-small at every batch; on lavapipe (a software rasterizer,
    // ~10 s a step here) only batch 1, and batch 32 runs on demo:gpt2, whose step feeds the same inputs (the bytes are O(batch)).
    // --quick: everything on demo:gpt2 at context 64 (a smoke run of the path, as gpu-check.sh's lavapipe mode makes).
    const gpuHost = process.env.DELTASERVE_BENCH_GPU === '1';
    const tiny = () => loadBackbone({ model: 'demo:gpt2', cacheDir: ctx.cacheDir });
    const results = ctx.quick
      ? [await measureDeviceStep(await tiny(), { batches: [1, 32], ctx: 64, steps: 3, devices: ['cpu', 'cuda', 'webgpu'], log })]
      : [
        await measureDeviceStep(await ctx.backbone(), { batches: [1, 32], ctx: 512, steps: 5, devices: ['cpu', 'cuda'], log }),
        await measureDeviceStep(await ctx.backbone(), { batches: gpuHost ? [1, 32] : [1], ctx: 512, steps: 3, devices: ['webgpu'], log }),
        ...(gpuHost ? [] : [await measureDeviceStep(await tiny(), { batches: [32], ctx: 512, steps: 5, devices: ['webgpu'], log })]),
      ];
    return {
      goals: [],
      outputs: [{
        title: TITLE,
        body: [
          'The real Engine stepped greedily at the KV capacity shown (rows prefilled to just over half of it), bare rows, decode-only steps, medians; bytes from the ' +
          'engine\'s own counter (`deltaserve_engine_transfer_bytes_total`). cuda is host-fed: its bytes are what its counter records, taken on the CPU ' +
          'provider because no CUDA ran here. webgpu ran on Mesa\'s lavapipe, a software Vulkan rasterizer on this shared 2-core CPU: its times say nothing ' +
          'about a GPU\'s.',
          deviceStepTable(results),
        ].join('\n\n'),
      }],
    };
  },
};
