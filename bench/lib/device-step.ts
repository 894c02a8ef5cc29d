/**
 * Issue 10, "what crosses per decode step": the real Engine at batch 1 and
 * 32, KV capacity `ctx`, on demo:gpt2-small, stepped through Engine.step()
 * with each device:
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
 * The rows reach the context one of two ways: a prompt of just over half the
 * capacity (prefilled through the model), or `prefix`: a PEFT PREFIX_TUNING
 * delta of hundreds of virtual tokens plus a short prompt. A prefix's K/V are
 * the delta's own (uploaded once into the prefill group's cache, no model
 * compute), so 32 rows stand at ~500 cached tokens after prefilling only
 * their short prompts: the way a software rasterizer gets there at all.
 *
 * Bytes are the engine's own counter (StepStats.transfer, the metric's
 * source) on decode-only steps (asserted: no prefill, every row decoding,
 * capacity `ctx`). Rows are greedy, or the first `sampling` of them sample
 * (temperature 1): their logits come back to the host. A prefix-tuned row
 * carries no bank (prefix tuning has no graph site); on a decode-only step a
 * bank never moves on webgpu, while on host-fed cuda banks would add their bytes.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Backbone } from '../../src/backbone/backbone.js';
import { buildEngineGraph } from '../../src/backbone/rewrite/index.js';
import { createSession, type ExecutionProvider } from '../../src/backbone/session.js';
import { planSites } from '../../src/deltas/kinds/index.js';
import { Registry } from '../../src/deltas/registry.js';
import { encodeSafetensors } from '../../src/deltas/safetensors.js';
import type { LoadedDelta } from '../../src/deltas/types.js';
import { HostDevice } from '../../src/engine/device/cpu.js';
import { deviceFor, outputLocations } from '../../src/engine/device/index.js';
import { Engine } from '../../src/engine/engine.js';
import { writeDelta } from '../../test/helpers/deltas.js';
import { fmt, mdTable, median, rand } from './common.js';

export interface DeviceStepRow {
  model: string;
  device: string;
  batch: number;
  /** How the rows reached the context, in words. */
  past: string;
  /** Rows that sample (the rest greedy). */
  sampling: number;
  toDevice: number[];
  toHost: number[];
  ms: number[] | null;
}

export interface DeviceStepResult {
  ctx: number;
  rows: DeviceStepRow[];
}

/** A PREFIX_TUNING delta of `virtualTokens` and prompts of `promptTokens` take the rows to the context. */
export interface PrefixPast {
  virtualTokens: number;
  promptTokens: number;
}

const GREEDY = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null };
const SAMPLE = (seed: number) => ({ temperature: 1, topK: 0, topP: 1, repetitionPenalty: 1, seed });

/** One PEFT PREFIX_TUNING delta (random K/V) for `bb`, written in PEFT's format and loaded through the registry. */
async function prefixDelta(bb: Backbone, virtualTokens: number): Promise<{ delta: LoadedDelta; remove(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), 'deltaserve-bench-device-'));
  const registry = await Registry.open({ dir: join(dir, 'deltas'), backbone: bb.info, cacheBytes: 2 ** 31 });
  const { numLayers: L } = bb.info;
  const { kvHeads: KV, headDim: D } = bb.io;
  const shape = [virtualTokens, L * 2 * KV * D];
  await registry.register('long-prefix', await writeDelta(join(dir, 'upload'), {
    'adapter_config.json': {
      peft_type: 'PREFIX_TUNING', task_type: 'CAUSAL_LM', inference_mode: true, num_virtual_tokens: virtualTokens,
      num_transformer_submodules: 1, token_dim: KV * D, num_attention_heads: KV, num_layers: L,
    },
    'adapter_model.safetensors': encodeSafetensors({ prompt_embeddings: { dtype: 'F32', shape, data: rand(shape[0] * shape[1], 7, 1) } }),
  }), { replace: false });
  return { delta: await registry.load('long-prefix'), remove: () => rm(dir, { recursive: true, force: true }) };
}

export async function measureDeviceStep(
  bb: Backbone,
  opts: {
    batches: number[]; ctx: number; steps: number; devices: ('cpu' | 'cuda' | 'webgpu')[]; log: (s: string) => void;
    prefix?: PrefixPast;
    /** Configurations by how many rows sample (default [0]: all greedy). */
    sampling?: number[];
  },
): Promise<DeviceStepResult> {
  const graph = buildEngineGraph(bb, planSites(bb));
  const prefix = opts.prefix ? await prefixDelta(bb, opts.prefix.virtualTokens) : null;
  const prompt = opts.prefix ? opts.prefix.promptTokens : Math.floor(opts.ctx / 2) + 4;
  const past = opts.prefix
    ? `${opts.prefix.virtualTokens}-token prefix (PREFIX_TUNING) + ${prompt}-token prompt`
    : `${prompt}-token prompt`;
  const rows: DeviceStepRow[] = [];
  try {
    for (const name of opts.devices) {
      const ep: ExecutionProvider = name === 'webgpu' ? 'webgpu' : 'cpu';
      const session = await createSession(graph.bytes, { ep, outputLocations: outputLocations(ep) });
      for (const B of opts.batches) {
        for (const sampling of opts.sampling ?? [0]) {
          if (sampling > B) continue;
          const engine = new Engine(session, bb.io, graph.sites, {
            maxBatch: B, prefillChunkTokens: 4096, eosTokenIds: [], maxPositions: bb.info.maxPositions,
            zeroSizeTensors: name === 'cpu', device: name === 'cuda' ? new HostDevice('cuda') : deviceFor(ep, bb.io.layers),
          });
          for (let b = 0; b < B; b++) {
            const promptIds = Array.from({ length: prompt }, (_, i) => 1 + ((b * 131 + i * 17) % (bb.io.vocabSize - 1)));
            engine.add({ rowId: b, promptIds, sampling: b < sampling ? SAMPLE(b + 1) : GREEDY, maxNewTokens: opts.steps + 3, delta: prefix?.delta ?? null });
          }
          const t0 = performance.now();
          const row: DeviceStepRow = {
            model: bb.info.name, device: name, batch: B, past, sampling, toDevice: [], toHost: [], ms: name === 'cuda' ? null : [],
          };
          let held = 0;
          while (row.toDevice.length < opts.steps) {
            const s = await engine.step();
            if (s.stats.prefillRows || s.stats.decodeRows !== B) continue;
            if (engine.kvCapacity !== opts.ctx) throw new Error(`KV capacity ${engine.kvCapacity}, not ${opts.ctx}`);
            held = s.stats.kvTokens / B;
            row.toDevice.push(s.stats.transfer.toDevice);
            row.toHost.push(s.stats.transfer.toHost);
            row.ms?.push(s.stats.decodeMs);
          }
          // The rows leave now (a step that only removes them: no further decode on a slow device).
          for (let b = 0; b < B; b++) engine.cancel(b);
          while (!engine.idle) await engine.step();
          rows.push(row);
          opts.log(`${bb.info.name} ${name} B=${B} (${sampling} sampling; ${past}, ${fmt(held, 0)} slots a row at the last step): ${fmt(median(row.toDevice), 0)} B to the device, ` +
            `${fmt(median(row.toHost), 0)} B to the host per step${row.ms ? `, ${fmt(median(row.ms))} ms` : ''} (${((performance.now() - t0) / 1000).toFixed(0)} s with prefill)`);
        }
      }
      await session.release();
    }
  } finally {
    await prefix?.remove();
  }
  return { ctx: opts.ctx, rows };
}

const kib = (bytes: number) => (bytes >= 1024 * 1024 ? `${fmt(bytes / 1024 / 1024, 1)} MiB` : bytes >= 1024 ? `${fmt(bytes / 1024, 1)} KiB` : `${fmt(bytes, 0)} B`);

export function deviceStepTable(results: DeviceStepResult[]): string {
  return mdTable(
    ['backbone', 'context', 'rows reached it by', 'device', 'batch', 'sampling rows', 'to device / step', 'to host / step', 'step (median)'],
    results.flatMap((res) => res.rows.map((r) => [r.model, res.ctx, r.past,
      r.device === 'cuda' ? 'cuda (host-fed; counted on the CPU provider)' : r.device === 'webgpu' ? 'webgpu (lavapipe: software Vulkan)' : 'cpu',
      r.batch, r.sampling, kib(median(r.toDevice)), kib(median(r.toHost)), r.ms ? `${fmt(median(r.ms))} ms` : 'not run (no CUDA here)',
    ])),
    ['l', 'r', 'l', 'l', 'r', 'r', 'r', 'r', 'r'],
  );
}
