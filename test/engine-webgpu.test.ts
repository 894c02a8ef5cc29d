/**
 * The engine on the WebGPU execution provider (KV cache and delta banks on
 * the device) against the same engine on the CPU provider: greedy tokens are
 * equal on the demo backbones, bare rows and LoRA, adapter, BitFit and IA³
 * rows mixed in one batch, as rows join and leave mid-stream (a prefill
 * group's rows joining the decode batch's cache in one device run); rows that
 * sample (their logits fetched alone) and rows asking for logprobs agree too.
 * The bare rows are also checked against a full forward pass of the original
 * graph, so the pair is not only equal to each other. And a decode step
 * moves only O(batch) bytes, counted by the device. Prompt learning's KV
 * prefixes (prefix tuning uploaded, prompt tuning's computed on the device),
 * chunked prefills after them, and rows at the context's end (capped
 * capacity, packed past) agree too, and so does a 4-bit quantized backbone. Runs on any Vulkan
 * driver (lavapipe in CI); skips loudly where WebGPU has no adapter.
 */
import assert from 'node:assert/strict';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import { loadBackbone, resolveModelDir, type Backbone } from '../src/backbone/backbone.js';
import { quantizeModelDir } from '../src/backbone/quant/quantize-model.js';
import type { SiteLayout } from '../src/backbone/rewrite/delta-sites.js';
import { createSession } from '../src/backbone/session.js';
import { Registry } from '../src/deltas/registry.js';
import { encodeSafetensors } from '../src/deltas/safetensors.js';
import type { LoadedDelta } from '../src/deltas/types.js';
import { deviceFor, outputLocations } from '../src/engine/device/index.js';
import { WebGpuDevice } from '../src/engine/device/webgpu.js';
import { Engine } from '../src/engine/engine.js';
import type { RowRequest, StepResult } from '../src/engine/protocol.js';
import { randomFloats, writeDelta } from './helpers/deltas.js';
import { defaultGraph, demo, everyKind, FAMILIES, fullForwardGreedy, loadCases, originalSession, testCacheDir, tokens, type KindCase, type Session } from './helpers/engine-graph.js';
import { webgpuMissing } from './helpers/webgpu.js';

const missing = webgpuMissing();
const GREEDY = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null };

/** A row of a schedule: added before step `at`, cancelled before step `cancelAt`. */
interface Planned {
  delta: LoadedDelta | null;
  promptIds: number[];
  maxNewTokens: number;
  at: number;
  cancelAt?: number;
  sampling?: RowRequest['sampling'];
  logprobs?: number;
}

async function serve(engine: Engine, plan: Planned[]) {
  const out = plan.map(() => [] as number[]);
  const logprobs = plan.map(() => [] as number[]);
  const steps: StepResult[] = [];
  for (let step = 0; step < 500 && (!engine.idle || plan.some((p) => p.at >= step)); step++) {
    plan.forEach((p, rowId) => {
      if (p.at === step) engine.add({ rowId, promptIds: p.promptIds, sampling: p.sampling ?? GREEDY, maxNewTokens: p.maxNewTokens, delta: p.delta, ...(p.logprobs !== undefined ? { logprobs: p.logprobs } : {}) });
      if (p.cancelAt === step) engine.cancel(rowId);
    });
    if (engine.idle) continue;
    const s = await engine.step();
    steps.push(s);
    for (const t of s.tokens) {
      out[t.rowId].push(t.token);
      if (t.logprobs) logprobs[t.rowId].push(t.logprobs.logprob);
    }
  }
  return { tokens: out, logprobs, steps };
}

for (const model of FAMILIES) {
  describe(`WebGPU equals CPU on ${model}`, { skip: missing ?? false }, () => {
    let bb: Backbone;
    let sites: SiteLayout[];
    let cpu: Session;
    let gpu: Session;
    let original: Session;
    let cases: KindCase[];
    const engines = (prefillChunkTokens = 64) => {
      const opts = { maxBatch: 16, prefillChunkTokens, eosTokenIds: [], maxPositions: bb.info.maxPositions };
      const device = deviceFor('webgpu', bb.io.layers);
      assert.ok(device instanceof WebGpuDevice);
      return {
        cpu: new Engine(cpu, bb.io, sites, opts),
        gpu: new Engine(gpu, bb.io, sites, { ...opts, zeroSizeTensors: false, device }),
        device,
      };
    };
    const prompt = (i: number, n = 3 + (i % 5)) => tokens(n, 900 + i, bb.io.vocabSize);

    before(async () => {
      ({ bb } = await demo(model));
      const all = everyKind(bb);
      cases = await loadCases(bb, all.filter((s) => ['lora4', 'lora16', 'relu', 'bitfit', 'ia3', 'compacter', 'compacter-r2', 'low-rank', 'low-rank-wide'].includes(s.id)));
      const g = defaultGraph(bb);
      sites = g.sites;
      cpu = await createSession(g.bytes);
      gpu = await createSession(g.bytes, { ep: 'webgpu', outputLocations: outputLocations('webgpu') });
      original = await originalSession(bb);
    });

    test('bare, LoRA, adapter, BitFit, IA³, factored compacter and low-rank adapter rows mixed, joining and leaving mid-stream: the same greedy tokens', async () => {
      const deltas = [null, ...cases.map((c) => c.delta)];
      const plan: Planned[] = Array.from({ length: 10 }, (_, i) => ({
        delta: deltas[i % deltas.length], promptIds: prompt(i, 3 + ((i * 7) % 11)), maxNewTokens: 3 + (i % 4) * 2,
        // Rows join at four different steps (a later group joins a running batch) and one leaves early.
        at: [0, 0, 0, 0, 2, 2, 3, 5, 5, 6][i], ...(i === 2 ? { cancelAt: 3 } : {}),
      }));
      const e = engines();
      // The device's own graph runs that write joining rows into the decode batch's cache, counted as they are made.
      let joinRuns = 0;
      const runOwn = e.device.runOwn.bind(e.device);
      e.device.runOwn = (name, feeds, transfer) => {
        if (name === 'join' || name === 'joinFirst') joinRuns++;
        return runOwn(name, feeds, transfer);
      };
      const want = await serve(e.cpu, plan);
      const got = await serve(e.gpu, plan);
      assert.deepEqual(got.tokens, want.tokens, 'WebGPU tokens differ from the CPU path\'s');
      assert.ok(got.steps.some((s) => s.stats.decodeRows > 0 && s.stats.prefillRows > 0), 'rows joined while others decoded');
      // Every prefill here finishes its group in one step (prompts < the chunk), and all of a group's rows join in one run.
      const groups = got.steps.filter((s) => s.stats.prefillRows > 0);
      assert.ok(groups.some((s) => s.stats.prefillRows > 1), 'a group of several rows joined');
      assert.equal(joinRuns, groups.length, 'one join run per prefill group, not one per row');
      // The bare rows, run to the end, against an independent full forward of the original graph.
      for (const [i, p] of plan.entries()) {
        if (p.delta || p.cancelAt !== undefined) continue;
        assert.deepEqual(got.tokens[i], await fullForwardGreedy(original, bb.io, p.promptIds, got.tokens[i]), `bare row ${i} against a full forward`);
      }
    });

    test('rows that sample beside greedy rows, and logprobs: the same tokens, logprobs within 1e-4', async () => {
      const sampling = { temperature: 0.8, topK: 20, topP: 0.95, repetitionPenalty: 1, seed: 7 };
      const plan: Planned[] = [
        { delta: null, promptIds: prompt(1), maxNewTokens: 5, at: 0, logprobs: 2 },
        { delta: cases[0].delta, promptIds: prompt(2), maxNewTokens: 5, at: 0, sampling, logprobs: 1 },
        { delta: cases[2].delta, promptIds: prompt(3), maxNewTokens: 5, at: 1, sampling: { ...sampling, seed: 8 } },
      ];
      const e = engines();
      const want = await serve(e.cpu, plan);
      const got = await serve(e.gpu, plan);
      assert.deepEqual(got.tokens, want.tokens);
      for (const [i, lps] of want.logprobs.entries()) {
        assert.equal(got.logprobs[i].length, lps.length);
        lps.forEach((lp, j) => assert.ok(Math.abs(got.logprobs[i][j] - lp) <= 1e-4, `row ${i} token ${j}: ${got.logprobs[i][j]} vs ${lp}`));
      }
    });

    test('prefix-tuned and prompt-tuned rows beside bare and LoRA rows, chunked, and rows at the context\'s end: the same greedy tokens', async () => {
      const { numLayers: L, hiddenSize: H } = bb.info;
      const { kvHeads: KV, headDim: D } = bb.io;
      const dir = join(testCacheDir(), `webgpu-prefix-${Math.random().toString(36).slice(2)}`);
      const registry = await Registry.open({ dir: join(dir, 'deltas'), backbone: bb.info, cacheBytes: 2 ** 30 });
      const put = async (id: string, config: Record<string, unknown>, weights: Float32Array, shape: number[]) => {
        const files = {
          'adapter_config.json': { peft_type: config.peft_type, task_type: 'CAUSAL_LM', inference_mode: true, base_model_name_or_path: 'demo', revision: null, ...config },
          'adapter_model.safetensors': encodeSafetensors({ prompt_embeddings: { dtype: 'F32', shape, data: weights } }),
        };
        await registry.register(id, await writeDelta(join(dir, 'upload', id), files), { replace: false });
        return registry.load(id);
      };
      const P1 = 5;
      const prefix = await put('prefix', {
        peft_type: 'PREFIX_TUNING', num_virtual_tokens: P1, token_dim: KV * D, num_transformer_submodules: 1, num_attention_heads: KV, num_layers: L,
        encoder_hidden_size: H, prefix_projection: false,
      }, randomFloats(P1 * L * 2 * KV * D, 71, 1.5), [P1, L * 2 * KV * D]);
      const P2 = 4;
      const prompted = await put('prompt', { peft_type: 'PROMPT_TUNING', num_virtual_tokens: P2, token_dim: H, num_transformer_submodules: 1, prompt_tuning_init: 'RANDOM' },
        randomFloats(P2 * H, 72, model === 'demo:gpt2' ? 0.3 : 1), [P2, H]);
      const deltas = [prefix, prompted, null, cases[0].delta];
      const mixed: Planned[] = Array.from({ length: 8 }, (_, i) => ({ delta: deltas[i % 4], promptIds: prompt(i, 3 + ((i * 5) % 9)), maxNewTokens: 5, at: i < 4 ? 0 : 2 }));
      // Near the context: capacity capped at its end less one, the prefill's past packed, the rows ending by length;
      // the two cannot share a prefill group (the prefix and the longer prompt together pass the context).
      const max = bb.info.maxPositions;
      const long: Planned[] = [
        { delta: null, promptIds: tokens(max - 4, 40, bb.io.vocabSize), maxNewTokens: 10, at: 0 },
        { delta: prefix, promptIds: tokens(max - P1 - 3, 41, bb.io.vocabSize), maxNewTokens: 10, at: 0 },
      ];
      for (const [plan, chunk] of [[mixed, 64], [mixed, 2 * 4], [long, 128]] as const) {
        const e = engines(chunk);
        // Prompt tuning's prefix computed by each engine afresh: first the CPU's, then the device's, compared.
        const forget = () => {
          Atomics.store(prompted.prefix!.ready, 0, 0);
          prompted.prefix!.keys.fill(0);
          prompted.prefix!.values.fill(0);
        };
        forget();
        const want = await serve(e.cpu, plan);
        const cpuKeys = prompted.prefix!.keys.slice();
        forget();
        const got = await serve(e.gpu, plan);
        assert.deepEqual(got.tokens, want.tokens, `WebGPU tokens differ from the CPU path's (prefill chunk ${chunk})`);
        if (plan === mixed) {
          assert.equal(Atomics.load(prompted.prefix!.ready, 0), 1, 'the device computed the prompt prefix');
          const worst = cpuKeys.reduce((m, k, i) => Math.max(m, Math.abs(k - prompted.prefix!.keys[i])), 0);
          assert.ok(worst <= 1e-4, `prompt prefix keys on the device vs the CPU: ${worst}`);
        } else {
          assert.ok(got.tokens.every((t) => t.length > 0 && t.length < 10), `the long rows end at the context: ${got.tokens.map((t) => t.length)}`);
        }
      }
    });

    test('a 4-bit quantized backbone (MatMulNBits): the same greedy tokens, bare and LoRA rows mixed', async () => {
      const out = await mkdtemp(join(tmpdir(), 'ds-webgpu-quant-'));
      await quantizeModelDir((await resolveModelDir({ model, cacheDir: testCacheDir() })).dir, out, { bits: 4, blockSize: 32 });
      const qbb = await loadBackbone({ model: out });
      assert.ok(qbb.info.modules.some((m) => m.quantization), 'the backbone is quantized');
      const g = defaultGraph(qbb);
      const opts = { maxBatch: 16, prefillChunkTokens: 64, eosTokenIds: [], maxPositions: qbb.info.maxPositions };
      const cpuEngine = new Engine(await createSession(g.bytes), qbb.io, g.sites, opts);
      const gpuEngine = new Engine(await createSession(g.bytes, { ep: 'webgpu', outputLocations: outputLocations('webgpu') }), qbb.io, g.sites,
        { ...opts, zeroSizeTensors: false, device: deviceFor('webgpu', qbb.io.layers) });
      const plan: Planned[] = Array.from({ length: 4 }, (_, i) => ({ delta: i % 2 ? cases[0].delta : null, promptIds: prompt(i, 4 + i), maxNewTokens: 5, at: 0 }));
      const want = await serve(cpuEngine, plan);
      const got = await serve(gpuEngine, plan);
      assert.deepEqual(got.tokens, want.tokens, 'WebGPU tokens differ from the CPU path\'s on the quantized backbone');
    });

    test('a decode step moves O(batch) bytes: ids, positions, lengths in, argmax ids and finite checks out (and the logits of sampling rows only); the CPU provider counts none', async () => {
      const plan: Planned[] = Array.from({ length: 8 }, (_, i) => ({ delta: i % 2 ? cases[i % cases.length].delta : null, promptIds: prompt(i, 6), maxNewTokens: 8, at: 0 }));
      const e = engines();
      const onCpu = await serve(e.cpu, plan);
      assert.ok(onCpu.steps.every((s) => s.stats.transfer.toDevice === 0 && s.stats.transfer.toHost === 0), 'nothing crosses on the CPU provider');
      const { steps } = await serve(e.gpu, plan);
      const decodeOnly = steps.filter((s) => s.stats.decodeRows === 8 && s.stats.prefillRows === 0).slice(1);
      assert.ok(decodeOnly.length >= 4);
      for (const s of decodeOnly) {
        // int64 ids and positions, float32 lengths for the mask and for the append (or a few offsets), one bool.
        assert.ok(s.stats.transfer.toDevice <= 8 * (8 + 8 + 4 + 4) + 100, `to the device: ${s.stats.transfer.toDevice} bytes`);
        assert.equal(s.stats.transfer.toHost, 8 * (8 + 4), 'to the host: the argmax ids and the finite check only');
      }
      // Two of the 8 rows sample: their logits come back, and only theirs (the other rows read the argmax).
      const sampling = { temperature: 1, topK: 0, topP: 1, repetitionPenalty: 1, seed: 3 };
      const mixed = await serve(engines().gpu, plan.map((p, i) => (i < 2 ? { ...p, sampling: { ...sampling, seed: i } } : p)));
      const sampled = mixed.steps.filter((s) => s.stats.decodeRows === 8 && s.stats.prefillRows === 0).slice(1);
      assert.ok(sampled.length >= 4);
      for (const s of sampled) {
        // The sampling rows' order (int64) besides the greedy step's feeds.
        assert.ok(s.stats.transfer.toDevice <= 8 * (8 + 8 + 4 + 4) + 100 + 2 * 8, `to the device, 2 rows sampling: ${s.stats.transfer.toDevice} bytes`);
        assert.equal(s.stats.transfer.toHost, 8 * (8 + 4) + 2 * bb.io.vocabSize * 4, 'to the host: the argmax ids, the finite check and 2 rows of logits');
      }
    });
  });
}
