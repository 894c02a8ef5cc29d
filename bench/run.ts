/**
 * `npm run bench`: every benchmark of issues 3, 5 and 18 on demo:gpt2-small
 * (GPT-2 small's exact shapes), in one process, figures and ratios measured
 * side by side; medians and minima of several repetitions (this VM is noisy).
 * Prints markdown tables and writes them to bench/results.md.
 *
 *   npm run bench                                   # everything, ~5–8 min on 2 cores
 *   npm run bench -- --quick                        # fewer repetitions, contexts 64 and 256 (~2–3 min)
 *   npm run bench -- --sections rewrite,kv          # rewrite | kv | throughput | naive | kinds | logprobs | device (or 1-7)
 *
 * Other flags: --reps N (throughput rounds), --contexts 64,256,512, --naive N
 * (naive requests actually measured, the rest extrapolated), --sequential N,
 * --max-new N, --prompt N, --out FILE, --no-write.
 *
 * The model is generated into DELTASERVE_CACHE_DIR (default ~/.cache/deltaserve)
 * on first use (~480 MB).
 */
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type * as ort from 'onnxruntime-node';
import { loadBackbone, type Backbone } from '../src/backbone/backbone.js';
import { buildEngineGraph } from '../src/backbone/rewrite/index.js';
import { planSites } from '../src/deltas/kinds/index.js';
import { benchCacheDir, fmt, machine, mdTable, median, minimum, progress } from './lib/common.js';
import { kindsGoals, kindsTables, measureKinds } from './lib/kinds-step.js';
import { kvFloorTables, measureKvFloor, type KvFloorResult } from './lib/kv-floor.js';
import { logprobsTable, measureLogprobs, NOT_ASKED_LABEL, type LogprobsBenchResult } from './lib/logprobs-step.js';
import { measureRewrite, NO_SITES_LABEL, ORIGINAL_LABEL, rewriteTables, type RewriteBenchResult } from './lib/rewrite-step.js';
import {
  benchRequests, healthTable, LORA_RANK, measureNaive, measureSequential, measureThroughput, naiveTable, startBenchStack,
  throughputTable, tokensPerSecond, type NaiveResult, type RunResult, type ThroughputResult,
} from './lib/serving.js';

// ---------------------------------------------------------------------------
// Flags.

const argv = process.argv.slice(2);
const has = (name: string) => argv.includes(`--${name}`);
const arg = (name: string): string | undefined => {
  const i = argv.indexOf(`--${name}`);
  if (i < 0) return undefined;
  const v = argv[i + 1];
  if (v === undefined || v.startsWith('--')) throw new Error(`--${name} needs a value`);
  return v;
};
const num = (name: string, dflt: number) => {
  const v = arg(name);
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0) throw new Error(`--${name} must be a number, got ${v}`);
  return n;
};
const KNOWN = new Set(['quick', 'sections', 'reps', 'contexts', 'naive', 'sequential', 'max-new', 'prompt', 'out', 'no-write', 'help']);
for (const a of argv) {
  if (a.startsWith('--') && !KNOWN.has(a.slice(2))) throw new Error(`unknown flag ${a}; see the comment at the top of bench/run.ts`);
}
if (has('help')) {
  console.log('npm run bench -- [--quick] [--sections rewrite,kv,throughput,naive,logprobs] [--reps N] [--contexts 64,256,512] [--naive N] [--sequential N] [--max-new N] [--prompt N] [--out FILE] [--no-write]');
  process.exit(0);
}

const QUICK = has('quick');
const SECTION_NAMES = ['rewrite', 'kv', 'throughput', 'naive', 'kinds', 'logprobs', 'device'] as const;
type Section = (typeof SECTION_NAMES)[number];
const sections = new Set<Section>(
  (arg('sections') ?? SECTION_NAMES.join(',')).split(',').map((s) => {
    const t = s.trim();
    const byNumber = SECTION_NAMES[Number(t) - 1];
    const name = (SECTION_NAMES as readonly string[]).includes(t) ? (t as Section) : byNumber;
    if (!name) throw new Error(`unknown section ${t}: use ${SECTION_NAMES.join(', ')} or 1-${SECTION_NAMES.length}`);
    return name;
  }),
);
const STREAMS = 32;
const cfg = {
  rewrite: { rounds: QUICK ? 2 : 5, perBlock: QUICK ? 4 : 8, context: 64, batches: [1, 8, 32] },
  kv: {
    batch: 32,
    contexts: (arg('contexts') ?? (QUICK ? '64,256' : '64,256,512')).split(',').map(Number),
    rounds: QUICK ? 2 : 6, perBlock: QUICK ? 3 : 3, originalRuns: QUICK ? 2 : 3, prefillChunkTokens: 4096,
  },
  kinds: { rounds: QUICK ? 2 : 6, perBlock: 4 },
  logprobs: { rounds: QUICK ? 10 : 40, context: 64, batches: [1, 8, 32] },
  reps: num('reps', QUICK ? 1 : 5),
  maxNew: num('max-new', QUICK ? 24 : 64),
  prompt: num('prompt', 32),
  naive: num('naive', QUICK ? 2 : STREAMS),
  sequential: num('sequential', QUICK ? 4 : STREAMS),
};
const OUT = arg('out') ?? fileURLToPath(new URL('./results.md', import.meta.url));

// ---------------------------------------------------------------------------

interface Goal {
  what: string;
  measured: string;
  met: string;
}

const yes = (ok: boolean) => (ok ? 'yes' : '**no**');

function rewriteGoals(res: RewriteBenchResult, planLabel: string): Goal[] {
  const find = (label: string) => res.configs.find((c) => c.label === label)!;
  const a = find(ORIGINAL_LABEL);
  const a2 = find(NO_SITES_LABEL);
  const none = find(`${planLabel}: no deltas`);
  const l32 = find(`${planLabel}: 32 distinct r16 LoRAs on c_attn`);
  const goals: Goal[] = [];
  const show = (x: Map<number, number>, y: Map<number, number>) => res.opts.batches.map((B) => `B=${B} ${fmt(x.get(B)! / y.get(B)!, 2)}`).join(', ');
  const all = (x: Map<number, number>, y: Map<number, number>, limit: number) => res.opts.batches.every((B) => x.get(B)! / y.get(B)! <= limit);
  goals.push({
    what: 'Rewrite: default plan, no deltas ≤ 1.05× the original graph (issue 3)',
    measured: `medians ${show(none.median, a.median)}; minima ${show(none.min, a.min)}`,
    met: `${yes(all(none.median, a.median, 1.05))} (medians), ${yes(all(none.min, a.min, 1.05))} (minima)`,
  });
  goals.push({
    what: "Rewrite: default plan, no deltas ≤ 1.05× the engine graph with no sites (a') — the same-I/O bare step",
    measured: `medians ${show(none.median, a2.median)}; minima ${show(none.min, a2.min)}`,
    met: `${yes(all(none.median, a2.median, 1.05))} (medians), ${yes(all(none.min, a2.min, 1.05))} (minima)`,
  });
  const B = Math.max(...res.opts.batches);
  const r = (x: Map<number, number>, y: Map<number, number>) => x.get(B)! / y.get(B)!;
  goals.push({
    what: `Rewrite: 32 distinct r16 LoRAs on c_attn ≤ 1.15× the bare step (B=${B})`,
    measured: `vs (a'): ${fmt(r(l32.median, a2.median), 2)} median, ${fmt(r(l32.min, a2.min), 2)} min; vs the same plan with no deltas: ${fmt(r(l32.median, none.median), 2)} median, ${fmt(r(l32.min, none.min), 2)} min`,
    met: `${yes(r(l32.median, a2.median) <= 1.15)} (medians vs a'), ${yes(r(l32.min, a2.min) <= 1.15)} (minima vs a')`,
  });
  return goals;
}

function logprobsGoals(res: LogprobsBenchResult): Goal[] {
  const b = res.configs.find((c) => c.label === NOT_ASKED_LABEL)!;
  const ratios = res.opts.batches.map((B) => b.ratio.get(B)!);
  return [{
    what: 'Logprobs: a greedy step where no row asks ≤ 1.03× the graph without the logprobs rewrite (issue 18)',
    measured: `paired medians ${ratios.map((r, i) => `B=${res.opts.batches[i]} ${fmt(r, 2)}`).join(', ')}`,
    met: yes(ratios.every((r) => r <= 1.03)),
  }];
}

function kvGoals(res: KvFloorResult): Goal[] {
  return [{
    what: 'KV cache: Engine.step() at batch 32 ≤ 1.5× its floor at every context (issue 5)',
    measured: res.rows.map((r) => `ctx ${r.ctx}: ${fmt(median(r.engineStep) / median(r.floor), 2)} median, ${fmt(minimum(r.engineStep) / minimum(r.floor), 2)} min`).join('; '),
    met: `${yes(res.rows.every((r) => median(r.engineStep) / median(r.floor) <= 1.5))} (medians), ${yes(res.rows.every((r) => minimum(r.engineStep) / minimum(r.floor) <= 1.5))} (minima)`,
  }];
}

function throughputGoals(tp: ThroughputResult): Goal[] {
  const b = tp.bare.map(tokensPerSecond);
  const m = tp.mixed.map(tokensPerSecond);
  const rm = median(m) / median(b);
  const rb = Math.max(...m) / Math.max(...b);
  return [{
    what: 'Throughput: 32 streams over 32 distinct r16 LoRAs ≥ 0.9× all bare (issue 5)',
    measured: `${fmt(median(m))} vs ${fmt(median(b))} tokens/s = ${fmt(rm, 2)} (medians); best runs ${fmt(rb, 2)}`,
    met: `${yes(rm >= 0.9)} (medians), ${yes(rb >= 0.9)} (best runs)`,
  }];
}

function naiveGoals(tp: ThroughputResult, naive: NaiveResult): Goal[] {
  const served = median(tp.mixed.map(tokensPerSecond));
  const ms = naive.measured.reduce((a, x) => a + x.totalMs, 0);
  const tokens = naive.measured.reduce((a, x) => a + x.tokens, 0);
  const r = served / (tokens / (ms / 1000));
  return [{
    what: 'deltaserve (32 concurrent, 32 LoRAs) ≥ 10× the naive way (issue 5)',
    measured: `${fmt(r, 1)}× (${fmt(served)} vs ${fmt(tokens / (ms / 1000), 2)} tokens/s; naive measured on ${naive.measured.length} of ${naive.of} requests)`,
    met: yes(r >= 10),
  }];
}

async function main(): Promise<void> {
  const cacheDir = benchCacheDir();
  const started = new Date();
  const t0 = Date.now();
  const m0 = machine();
  const command = process.env.npm_lifecycle_event === 'bench'
    ? `npm run bench${argv.length ? ` -- ${argv.join(' ')}` : ''}`
    : `npx tsx bench/run.ts${argv.length ? ` ${argv.join(' ')}` : ''}`;
  progress(`sections: ${[...sections].join(', ')}${QUICK ? ' (quick)' : ''}; model cache ${cacheDir}`);

  const parts: string[] = [];
  const goals: Goal[] = [];
  const add = (title: string, body: string) => {
    parts.push(`## ${title}\n\n${body}\n`);
    console.log(`\n## ${title}\n\n${body}`);
  };

  let bb: Backbone | null = null;
  let rewrite: RewriteBenchResult | null = null;
  const DEFAULT_PLAN = 'engine, default plan';
  const toRelease: ort.InferenceSession[] = [];

  if (sections.has('rewrite') || sections.has('kv') || sections.has('kinds') || sections.has('logprobs')) {
    const t = Date.now();
    bb = await loadBackbone({ model: 'demo:gpt2-small', cacheDir });
    progress(`loaded ${bb.info.name} in ${((Date.now() - t) / 1000).toFixed(1)} s`);
  }

  if (sections.has('rewrite')) {
    progress('section 1: rewrite (issue 3)');
    rewrite = await measureRewrite(bb!, { ...cfg.rewrite, plans: { [DEFAULT_PLAN]: {} }, log: progress });
    toRelease.push(rewrite.sessions.original, rewrite.sessions.noSites, ...rewrite.sessions.byPlan.values());
    const g = rewriteGoals(rewrite, DEFAULT_PLAN);
    goals.push(...g);
    add('1. Rewrite: decode step per batch size (issue 3)', [
      `Default site plan = \`planSites(bb)\`: LoRA and bias sites on all 48 linears, adapter sites on each block's attn.c_proj and mlp.c_proj (adapter branches behind an If), IA³ scale sites on c_attn and mlp.c_proj. ` +
      `(a) is the original Optimum graph (returns present = Concat and [B,1,V] logits); (a') the engine graph with no sites (same I/O as the engine: new K/V only, last logits). ` +
      `Context 64, random past, all-ones mask; banks built outside the timed step, as the engine does; at B=1 the LoRA rows hold one LoRA, at B=8 eight.`,
      rewriteTables(rewrite).trim(),
    ].join('\n\n'));
  }

  if (sections.has('kv')) {
    progress('section 2: KV cache vs floor (issue 5)');
    const g = buildEngineGraph(bb!, planSites(bb!));
    const { createSession } = await import('../src/backbone/session.js');
    const { encodeModel } = await import('../src/backbone/onnx/proto.js');
    const engine = rewrite?.sessions.byPlan.get(DEFAULT_PLAN) ?? (await createSession(g.bytes));
    const original = rewrite?.sessions.original ?? (await createSession(encodeModel(bb!.source.model)));
    if (!rewrite) toRelease.push(engine, original);
    const kv = await measureKvFloor(bb!, { engine, engineSites: g.sites, original }, { ...cfg.kv, log: progress });
    goals.push(...kvGoals(kv));
    add('2. KV cache: engine decode step vs its floor (issue 5)', [
      'The real `Engine` (src/engine/engine.ts) in-process on `createSession(buildEngineGraph(bb, planSites(bb)).bytes)`: 32 rows added with prompts of `ctx − steps − 1` tokens, ' +
      'prefilled (untimed), then `Engine.step()` timed on decode-only steps whose KV capacity is `ctx` (asserted each step). ' +
      'The floor is a GraphBuilder graph of only the 49 weight Gemms of a step (the backbone\'s own initializers, on [32, in] inputs) plus a ReduceSum of every past tensor [32, 12, ctx, 64]; ' +
      'its two halves are also timed alone. The original Optimum graph gets random past of length ctx and returns present = Concat(past, new).',
      kvFloorTables(kv),
    ].join('\n\n'));
  }

  if (sections.has('kinds')) {
    progress('section 5: delta kinds and bank rank fall-back (issue 11)');
    const g = buildEngineGraph(bb!, planSites(bb!));
    const { createSession } = await import('../src/backbone/session.js');
    const engine = rewrite?.sessions.byPlan.get(DEFAULT_PLAN) ?? (await createSession(g.bytes));
    if (!rewrite) toRelease.push(engine);
    const kinds = await measureKinds(bb!, engine, g.sites, { ...cfg.kinds, log: progress });
    goals.push(...kindsGoals(kinds));
    add('5. Delta kinds: decode steps at batch 32, and the banks\' rank fall-back (issue 11)', [
      'The real `Engine` in-process on the default site plan; every configuration an Engine of its own, its rows prefilled untimed, ' +
      'deltas written in their formats (test/helpers/kind-cases.ts) and loaded through the registry; 4 distinct deltas per kind cycled over the rows, 32 distinct r8 LoRAs.',
      kindsTables(kinds),
    ].join('\n\n'));
  }

  if (sections.has('logprobs')) {
    progress('section 6: logprobs (issue 18)');
    const lp = await measureLogprobs(bb!, { ...cfg.logprobs, log: progress });
    goals.push(...logprobsGoals(lp));
    add('6. Logprobs: the greedy step with and without them (issue 18)', [
      'session.run of one decode step with the fetches the engine makes (random past, all-ones mask, bare banks). ' +
      'The logprobs (top-5 log-probabilities and ids, log-sum-exp) sit behind an If on `logprobs_on`; (a) is the same graph with that If pruned, ' +
      'as the engine graph was before it. (b) against (a) is what a greedy step pays when nobody asks; (c) what asking costs; ' +
      '(d) what fetching the logits for a JavaScript log-softmax would cost instead.',
      logprobsTable(lp),
    ].join('\n\n'));
  }

  if (sections.has('device')) {
    progress('section 7: bytes crossing per decode step, by device (issue 10)');
    const { measureDeviceStep, deviceStepTable } = await import('./lib/device-step.js');
    const log = progress;
    // On a GPU host (scripts/gpu-check.sh) webgpu runs gpt2-small at every batch; on lavapipe (a software rasterizer,
    // ~10 s a step here) only batch 1, and batch 32 runs on demo:gpt2, whose step feeds the same inputs (the bytes are O(batch)).
    // --quick: everything on demo:gpt2 at context 64 (a smoke run of the path, as gpu-check.sh's lavapipe mode makes).
    const gpuHost = process.env.DELTASERVE_BENCH_GPU === '1';
    const tiny = async () => loadBackbone({ model: 'demo:gpt2', cacheDir });
    const results = QUICK
      ? [await measureDeviceStep(await tiny(), { batches: [1, 32], ctx: 64, steps: 3, devices: ['cpu', 'cuda', 'webgpu'], log })]
      : [
        await measureDeviceStep(bb ?? await loadBackbone({ model: 'demo:gpt2-small', cacheDir }), { batches: [1, 32], ctx: 512, steps: 5, devices: ['cpu', 'cuda'], log }),
        await measureDeviceStep(bb ?? await loadBackbone({ model: 'demo:gpt2-small', cacheDir }), { batches: gpuHost ? [1, 32] : [1], ctx: 512, steps: 3, devices: ['webgpu'], log }),
        ...(gpuHost ? [] : [await measureDeviceStep(await tiny(), { batches: [32], ctx: 512, steps: 5, devices: ['webgpu'], log })]),
      ];
    add('7. Bytes crossing per decode step, by device (issue 10)', [
      'The real Engine stepped greedily at the KV capacity shown (rows prefilled to just over half of it), bare rows, decode-only steps, medians; bytes from the ' +
      'engine\'s own counter (`deltaserve_engine_transfer_bytes_total`). cuda is host-fed: its bytes are what its counter records, taken on the CPU ' +
      'provider because no CUDA ran here. webgpu ran on Mesa\'s lavapipe, a software Vulkan rasterizer on this shared 2-core CPU: its times say nothing ' +
      'about a GPU\'s.',
      deviceStepTable(results),
    ].join('\n\n'));
  }

  for (const s of toRelease) await s.release();
  toRelease.length = 0;
  bb = null;

  let tp: ThroughputResult | null = null;
  let seq: RunResult | null = null;
  let naive: NaiveResult | null = null;
  if (sections.has('throughput') || sections.has('naive')) {
    progress('sections 3-4: real serving stack (startServices: store, registry, engine worker, scheduler, express app)');
    const stack = await startBenchStack({ cacheDir, loras: STREAMS, log: progress });
    try {
      const reqs = benchRequests(stack, STREAMS, cfg.prompt);
      {
        // The naive section needs these figures too: deltaserve's side of its ratio.
        progress('section 3: throughput, 32 concurrent streams, bare vs 32 distinct LoRAs');
        tp = await measureThroughput(stack, reqs, { reps: cfg.reps, maxNew: cfg.maxNew, promptTokens: cfg.prompt, log: progress });
        goals.push(...throughputGoals(tp));
        add('3. Throughput: 32 concurrent streams, bare vs 32 distinct LoRAs (issue 5)', [
          `Through the real \`Scheduler\` and \`EngineClient\` worker (\`startServices\` with a temporary delta store), default config (max batch 32, max_loras 32); ` +
          `${STREAMS} PEFT LoRAs (rank ${LORA_RANK}, lora_alpha ${2 * LORA_RANK}, target_modules [c_attn], fan_in_fan_out) written as adapter_config.json + adapter_model.safetensors and registered through the registry. ` +
          'Tokens/s = generated tokens of all requests ÷ wall time from submitting the first to the last one finishing (prefill included).',
          throughputTable(tp),
          healthTable(tp),
        ].join('\n\n'));
      }
      if (sections.has('naive')) {
        progress(`section 4: sequential through deltaserve (${Math.min(cfg.sequential, STREAMS)} requests), naive (${Math.min(cfg.naive, STREAMS)} requests)`);
        if (cfg.sequential > 0) seq = await measureSequential(stack, reqs.slice(0, Math.min(cfg.sequential, STREAMS)), cfg.maxNew);
        if (cfg.naive > 0) {
          naive = await measureNaive(stack, reqs, { n: Math.min(cfg.naive, STREAMS), maxNew: cfg.maxNew, reference: tp?.mixed.at(-1)?.outputs ?? null, log: progress });
        }
        if (tp && naive) goals.push(...naiveGoals(tp, naive));
        add('4. Naive baseline: the same 32 requests, one at a time, each attaching its delta (issue 5)', [
          'Naive: for each request, `registry.load(id)`, merge the LoRA into the backbone\'s ONNX initializers (W += a·b on each c_attn Gemm weight [in, out]; a [in, r], b [r, out] with the scale folded), ' +
          'encode the model and create an ORT session on it (same options as deltaserve), generate greedily with the plain KV-cache loop at batch 1 on the Optimum graph (present fed back as past), then restore the weights and release the session. ' +
          (naive && naive.measured.length < STREAMS ? `**Only ${naive.measured.length} of ${STREAMS} naive requests were measured; the time for all ${STREAMS} is extrapolated from their mean (tokens/s is the measured rate).** ` : '') +
          (seq && seq.requests < STREAMS ? `The sequential deltaserve run measured ${seq.requests} of ${STREAMS} requests; its ${STREAMS}-request time is extrapolated. ` : '') +
          'The last column divides deltaserve\'s 32-concurrent mixed-LoRA tokens/s (section 3, median) by each way\'s tokens/s.',
          naiveTable(tp, seq, naive, STREAMS),
        ].join('\n\n'));
      }
    } finally {
      await stack.close();
    }
  }

  const m1 = machine();
  const total = (Date.now() - t0) / 1000;
  const goalTable = goals.length ? mdTable(['goal', 'measured', 'met?'], goals.map((g) => [g.what, g.measured, g.met]), ['l', 'l', 'l']) : '(no goals measured)';
  console.log(`\n## Goals\n\n${goalTable}\n\nTotal ${total.toFixed(0)} s.`);

  const header = [
    '# deltaserve benchmarks (`npm run bench`)',
    '',
    `- Date: ${started.toISOString()}`,
    `- Command: \`${command}\`${QUICK ? ' (quick: fewer repetitions; not the figures to quote)' : ''}`,
    `- Machine: ${m0.nproc} × ${m0.cpu} (nproc ${m0.nproc}), Node ${m0.node}, onnxruntime-node ${m0.ort}, CPU execution provider, ORT intra-op threads = default (one per core)`,
    `- Load average (1, 5, 15 min) at start: ${m0.load}; at end: ${m1.load} — a shared 2-core VM: other processes running at the same time inflate the medians; the minima are the least disturbed figures.`,
    `- Model: demo:gpt2-small (GPT-2 small's exact shapes: 12 layers, 768 wide, 12 heads, vocab 50257), cache ${cacheDir}`,
    `- Sections: ${[...sections].join(', ')}; total ${total.toFixed(0)} s`,
    '',
  ].join('\n');
  const doc = `${header}\n## Goals\n\n${goalTable}\n\n${parts.join('\n')}`;
  if (!has('no-write')) {
    writeFileSync(OUT, doc);
    progress(`wrote ${OUT}`);
  }
}

await main();
// The ORT thread pools of released sessions and the worker are gone; exit even if a handle lingers.
process.exit(0);
