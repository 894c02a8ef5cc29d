/**
 * The hardware's limit (issue 14, item 3), in the same run as the step it
 * judges: onnxruntime's own MatMul throughput at the decode step's shapes
 * (the step's weight Gemms alone, bench/lib/kv-floor.ts's floor graph) and
 * the memory bandwidth a batch-1 step is bound by (a ReduceSum over 256 MB),
 * against the real Engine's decode step at batch 1 and 32, interleaved.
 */
import * as ort from 'onnxruntime-node';
import { buildEngineGraph } from '../../src/backbone/rewrite/index.js';
import { createSession } from '../../src/backbone/session.js';
import { DataType, GraphBuilder } from '../../src/backbone/onnx/graph-builder.js';
import { planSites } from '../../src/deltas/kinds/index.js';
import { Engine } from '../../src/engine/engine.js';
import { fmt, mdTable, median, rand } from '../lib/common.js';
import { buildFloorGraph } from '../lib/kv-floor.js';
import type { BenchSection } from '../lib/runner.js';
import { yes } from './goals.js';

const BANDWIDTH_FLOATS = 64 * 2 ** 20; // 256 MB, far past any cache

function reduceGraph(): Uint8Array {
  const g = new GraphBuilder();
  const x = g.input('x', DataType.FLOAT, [BANDWIDTH_FLOATS]);
  g.opNamed('ReduceSum', [x], 'sum', { keepdims: 0 });
  g.output('sum', DataType.FLOAT, []);
  return g.encode('bandwidth');
}

export const section: BenchSection = {
  name: 'hardware',
  async run(ctx) {
    const bb = await ctx.backbone();
    const rounds = ctx.quick ? 1 : 8;
    const perBlock = ctx.quick ? 2 : 4;
    const g = buildEngineGraph(bb, planSites(bb));
    const session = await createSession(g.bytes);
    const matmuls = await createSession(buildFloorGraph(bb, { weights: true, cache: false }));
    const reduce = await createSession(reduceGraph());
    ctx.onRelease(async () => {
      for (const s of [session, matmuls, reduce]) await s.release();
    });
    const weightBytes = bb.linear.reduce((n, m) => n + 4 * m.inFeatures * m.outFeatures, 0);
    const flopsPerRow = bb.linear.reduce((n, m) => n + 2 * m.inFeatures * m.outFeatures, 0);
    const big = { x: new ort.Tensor('float32', rand(BANDWIDTH_FLOATS, 3, 1), [BANDWIDTH_FLOATS]) };

    const rows: { B: number; step: number[]; matmul: number[] }[] = [];
    const bandwidthMs: number[] = [];
    for (const B of [1, 32]) {
      const engine = new Engine(session, bb.io, g.sites, { maxBatch: B, prefillChunkTokens: 4096, eosTokenIds: [], maxPositions: bb.info.maxPositions });
      for (let r = 0; r < B; r++) {
        engine.add({
          rowId: r + 1, promptIds: Array.from({ length: 48 }, (_, i) => 32 + ((i * 7 + r * 13) % 95)),
          sampling: { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null }, maxNewTokens: 100_000, delta: null,
        });
      }
      while ((await engine.step()).stats.decodeRows !== B) { /* prefill */ }
      const feeds: Record<string, ort.Tensor> = {};
      for (const m of bb.linear) feeds[`x${m.inFeatures}`] ??= new ort.Tensor('float32', rand(B * m.inFeatures, m.inFeatures, 1), [B, m.inFeatures]);
      const row = { B, step: [] as number[], matmul: [] as number[] };
      for (let round = 0; round < rounds; round++) {
        for (let i = 0; i <= perBlock; i++) {
          const t = performance.now();
          await engine.step();
          if (i) row.step.push(performance.now() - t);
        }
        for (let i = 0; i <= perBlock; i++) {
          const t = performance.now();
          await matmuls.run(feeds);
          if (i) row.matmul.push(performance.now() - t);
        }
        if (B === 1) {
          for (let i = 0; i <= 2; i++) {
            const t = performance.now();
            await reduce.run(big);
            if (i) bandwidthMs.push(performance.now() - t);
          }
        }
      }
      rows.push(row);
    }
    const gbps = (4 * BANDWIDTH_FLOATS) / (median(bandwidthMs) / 1000) / 1e9;
    const b1 = rows[0];
    const b32 = rows[1];
    const gflops = (B: number, ms: number) => (flopsPerRow * B) / (ms / 1000) / 1e9;
    const mm32 = gflops(32, median(b32.matmul));
    const step32 = gflops(32, median(b32.step));
    const boundMs = weightBytes / (gbps * 1e9) * 1000;
    const eff1 = boundMs / median(b1.step);
    const eff32 = step32 / mm32;
    return {
      goals: [
        {
          what: 'Hardware: decode step at batch 32 ≥ 60 % of onnxruntime\'s MatMul throughput at the step\'s shapes (issue 14)',
          measured: `${fmt(step32)} of ${fmt(mm32)} GFLOP/s = ${fmt(100 * eff32, 0)} %`,
          met: yes(eff32 >= 0.6),
        },
        {
          what: 'Hardware: decode step at batch 1 ≥ 60 % of the memory-bandwidth bound (issue 14)',
          measured: `bound ${fmt(boundMs)} ms (${fmt(weightBytes / 2 ** 20, 0)} MiB of weights at ${fmt(gbps)} GB/s) vs step ${fmt(median(b1.step))} ms = ${fmt(100 * eff1, 0)} %`,
          met: yes(eff1 >= 0.6),
        },
      ],
      outputs: [{
        title: '12. The hardware\'s limit: the decode step against MatMul throughput and memory bandwidth (issue 14)',
        body: [
          'The real `Engine` in-process (default site plan, no deltas, 48-token prompts prefilled untimed), its decode steps timed in blocks interleaved with blocks of ' +
          `onnxruntime running only the step's ${bb.linear.length} weight matmuls (every MatMul/Gemm of the backbone with a 2-D weight initializer, on its own initializers) on [B, in] inputs — what the MatMul kernels can do at exactly these shapes — ` +
          `and a ReduceSum over a 256 MB tensor (read bandwidth). FLOPs counted are the weight matmuls' (2·B·in·out, ${fmt(flopsPerRow / 1e9, 3)} GFLOP per row); attention over the KV cache is not counted, so the efficiency is a lower bound. ` +
          'Medians; the machine was shared and busy while this ran.',
          mdTable(['batch', 'engine step ms', 'weight Gemms alone ms', 'step GFLOP/s', 'Gemms GFLOP/s', 'step ÷ Gemms'], rows.map((r) => [
            r.B, fmt(median(r.step), 2), fmt(median(r.matmul), 2), fmt(gflops(r.B, median(r.step))), fmt(gflops(r.B, median(r.matmul))),
            `${fmt(100 * median(r.matmul) / median(r.step), 0)} %`,
          ])),
          mdTable(['memory bandwidth (ReduceSum over 256 MB)', 'GB/s', 'batch-1 bound: weights ÷ bandwidth', 'batch-1 step', 'step efficiency'], [[
            'median', fmt(gbps), `${fmt(boundMs, 2)} ms`, `${fmt(median(b1.step), 2)} ms`, `${fmt(100 * eff1, 0)} %`,
          ]]),
        ].join('\n\n'),
      }],
    };
  },
};
