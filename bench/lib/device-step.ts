/**
 * Issue 10, "what crosses per decode step": the real Engine at batch 1 and
 * 32, KV capacity `ctx` (rows prefilled to just over half of it), greedy, on
 * demo:gpt2-small, stepped through Engine.step() with each device:
 *
 * - cpu: the CPU provider reading host arrays in place (counter: nothing crosses);
 * - cuda (host-fed): what DELTASERVE_EP=cuda's counter records: every feed
 *   (the whole KV cache, the banks, the mask) and every output each step.
 *   No CUDA here, so it is the same HostDevice('cuda') counting on the CPU
 *   provider: the bytes are the provider's feeds and outputs, not its speed;
 *   no time is given for it;
 * - webgpu: the KV cache and banks on the device (onnxruntime-node's WebGPU
 *   provider; here Mesa's lavapipe, a software Vulkan rasterizer on the CPU,
 *   so its step time says nothing about a GPU's).
 *
 * Bytes are the engine's own counter (StepStats.transfer, the metric's
 * source) on decode-only steps (asserted: no prefill, capacity `ctx`).
 * Rows are bare (a bank changes only when rows join or leave, never on a
 * decode-only step on webgpu; on host-fed cuda banks would add their bytes).
 */
import type { Backbone } from '../../src/backbone/backbone.js';
import { buildEngineGraph } from '../../src/backbone/rewrite/index.js';
import { createSession, type ExecutionProvider } from '../../src/backbone/session.js';
import { planSites } from '../../src/deltas/kinds/index.js';
import { HostDevice } from '../../src/engine/device/cpu.js';
import { deviceFor, outputLocations } from '../../src/engine/device/index.js';
import { Engine } from '../../src/engine/engine.js';
import { fmt, mdTable, median } from './common.js';

export interface DeviceStepRow {
  model: string;
  device: string;
  batch: number;
  toDevice: number[];
  toHost: number[];
  ms: number[] | null;
}

export interface DeviceStepResult {
  ctx: number;
  rows: DeviceStepRow[];
}

const GREEDY = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null };

export async function measureDeviceStep(
  bb: Backbone,
  opts: {
    batches: number[]; ctx: number; steps: number; devices: ('cpu' | 'cuda' | 'webgpu')[]; log: (s: string) => void;
  },
): Promise<DeviceStepResult> {
  const graph = buildEngineGraph(bb, planSites(bb));
  const rows: DeviceStepRow[] = [];
  for (const name of opts.devices) {
    const ep: ExecutionProvider = name === 'webgpu' ? 'webgpu' : 'cpu';
    const session = await createSession(graph.bytes, { ep, outputLocations: outputLocations(ep) });
    for (const B of opts.batches) {
      const engine = new Engine(session, bb.io, graph.sites, {
        maxBatch: B, prefillChunkTokens: 4096, eosTokenIds: [], maxPositions: bb.info.maxPositions,
        zeroSizeTensors: name === 'cpu', device: name === 'cuda' ? new HostDevice('cuda') : deviceFor(ep, bb.io.layers),
      });
      const prompt = Math.floor(opts.ctx / 2) + 4;
      for (let b = 0; b < B; b++) {
        const promptIds = Array.from({ length: prompt }, (_, i) => 1 + ((b * 131 + i * 17) % (bb.io.vocabSize - 1)));
        engine.add({ rowId: b, promptIds, sampling: GREEDY, maxNewTokens: opts.steps + 3, delta: null });
      }
      const t0 = performance.now();
      const row: DeviceStepRow = { model: bb.info.name, device: name, batch: B, toDevice: [], toHost: [], ms: name === 'cuda' ? null : [] };
      while (row.toDevice.length < opts.steps) {
        const s = await engine.step();
        if (s.stats.prefillRows || s.stats.decodeRows !== B) continue;
        if (engine.kvCapacity !== opts.ctx) throw new Error(`KV capacity ${engine.kvCapacity}, not ${opts.ctx}`);
        row.toDevice.push(s.stats.transfer.toDevice);
        row.toHost.push(s.stats.transfer.toHost);
        row.ms?.push(s.stats.decodeMs);
      }
      while (!engine.idle) await engine.step();
      rows.push(row);
      opts.log(`${bb.info.name} ${name} B=${B}: ${fmt(median(row.toDevice), 0)} B to the device, ${fmt(median(row.toHost), 0)} B to the host per step${row.ms ? `, ${fmt(median(row.ms))} ms` : ''} (${((performance.now() - t0) / 1000).toFixed(0)} s with prefill)`);
    }
    await session.release();
  }
  return { ctx: opts.ctx, rows };
}

const kib = (bytes: number) => (bytes >= 1024 * 1024 ? `${fmt(bytes / 1024 / 1024, 1)} MiB` : bytes >= 1024 ? `${fmt(bytes / 1024, 1)} KiB` : `${fmt(bytes, 0)} B`);

export function deviceStepTable(results: DeviceStepResult[]): string {
  return mdTable(
    ['backbone', 'context', 'device', 'batch', 'to device / step', 'to host / step', 'step (median)'],
    results.flatMap((res) => res.rows.map((r) => [r.model, res.ctx,
      r.device === 'cuda' ? 'cuda (host-fed; counted on the CPU provider)' : r.device === 'webgpu' ? 'webgpu (lavapipe: software Vulkan)' : 'cpu',
      r.batch, kib(median(r.toDevice)), kib(median(r.toHost)), r.ms ? `${fmt(median(r.ms))} ms` : 'not run (no CUDA here)',
    ])),
    ['l', 'r', 'l', 'r', 'r', 'r', 'r'],
  );
}
