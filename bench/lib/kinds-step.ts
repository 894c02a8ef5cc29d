/**
 * Decode steps of the real Engine (in-process, demo:gpt2-small, the default
 * site plan) over delta kinds (issue 11):
 *
 * - rank fall-back: 32 rank-8 LoRA rows after a rank-64 row left and a 32nd
 *   rank-8 row took its place, against 32 rank-8 rows from the start, and
 *   against 31 rank-8 rows beside a rank-64 row (every row fed rank 64: what
 *   the banks fed, before they shrank back, for as long as the server ran);
 * - every kind at batch 32: bare rows, 32 rows of one kind, and the kinds
 *   mixed row by row.
 *
 * Every configuration is an Engine of its own, prefilled untimed; timed steps
 * are pure decode steps of 32 rows at the same KV capacity, in blocks
 * round-robin over the configurations so drift hits all alike.
 *
 * Compacters both ways (bottleneck 48, n 4): factored through the compacter
 * site (rank-1 W factors, as OpenDelta saves them by default) against the
 * same shapes multiplied out through the adapter site (W saved whole), 32 rows
 * of each and each in the every-kind mixed batch.
 *
 * Low-rank adapters both ways (bottleneck 24): factored through their own
 * site (as served) against an adapter of the same shapes on the adapter site
 * (what the low-rank adapter cost multiplied out: the same ops on the same
 * bank sizes, whatever the values), 32 rows of each. And one low-rank adapter
 * branch on its own (GPT-2 small's c_proj, per-row banks at batch 32), the
 * two forms' ops side by side without the rest of the step.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { DataType, GraphBuilder } from '../../src/backbone/onnx/graph-builder.js';
import { createSession } from '../../src/backbone/session.js';
import type { Backbone } from '../../src/backbone/backbone.js';
import type { SiteLayout } from '../../src/backbone/rewrite/delta-sites.js';
import { Registry } from '../../src/deltas/registry.js';
import type { LoadedDelta } from '../../src/deltas/types.js';
import { Engine } from '../../src/engine/engine.js';
import { writeDelta } from '../../test/helpers/deltas.js';
import { deltaFiles, encodeTensors, type TaskSpec } from '../../test/helpers/kind-cases.js';
import { fmt, mdTable, median, minimum, rand } from './common.js';

const B = 32;
const PROMPT = 4;
/** Decode steps before the KV pool starts filling its next bucket (capacity 64 − GROWTH_LEAD − the prompt − untimed steps). */
const STEPS_AT_CAPACITY = 30;

export interface KindsBenchOptions {
  rounds: number;
  /** Timed steps per block (after one warm-up step). */
  perBlock: number;
  log: (msg: string) => void;
}

interface Config {
  label: string;
  group: 'fallback' | 'kinds';
  /** Rows added at the start; `joins` are added once every row whose maxNewTokens is small has left. */
  rows: { delta: LoadedDelta | null; maxNewTokens: number }[];
  joins?: LoadedDelta[];
}

export interface KindsConfigResult {
  label: string;
  group: Config['group'];
  steps: number[];
  /** The rank the c_attn LoRA site was fed in the timed steps. */
  loraRank: number;
  bankBytes: number;
}

export interface BranchResult {
  label: string;
  /** Bank floats a row reads in this branch. */
  floatsPerRow: number;
  runs: number[];
}

export interface KindsBenchResult {
  configs: KindsConfigResult[];
  lowRank: BranchResult[];
  opts: KindsBenchOptions;
  seconds: number;
}

const FACTORED = 'compacter (bottleneck 48, n 4, rank-1 W factors) on c_proj: factored, compacter site';
const MULTIPLIED = 'compacter (bottleneck 48, n 4, W saved whole) on c_proj: multiplied out, adapter site';
const LOW_RANK = 'low-rank adapter (bottleneck 24) on c_proj: factored, low-rank adapter site';
const LOW_RANK_MULTIPLIED = 'low-rank adapter multiplied out (an adapter of its shapes: bottleneck 24, gelu_new) on c_proj, adapter site';

/** What the kinds' deltas look like on GPT-2 small, as their formats save them. */
function specs(): Record<string, (k: number) => TaskSpec> {
  const out = ['attn.c_proj', 'mlp.c_proj'];
  return {
    'LoRA r8 on c_attn': (k) => ({ id: `lora8-${k}`, kind: 'peft-lora', rank: 8, targets: ['c_attn'], seed: 100 + k }),
    'adapter (bottleneck 16, gelu_new) on c_proj': (k) => ({ id: `adapter-${k}`, kind: 'adapter', bottleneck: 16, activation: 'gelu_new', targets: out, seed: 200 + k }),
    'BitFit on c_attn, c_fc': (k) => ({ id: `bitfit-${k}`, kind: 'bitfit', targets: ['c_attn', 'c_fc'], seed: 300 + k }),
    'IA³ on c_attn, mlp.c_proj': (k) => ({ id: `ia3-${k}`, kind: 'ia3', targets: ['c_attn', 'mlp.c_proj'], feedforward: ['mlp.c_proj'], seed: 400 + k }),
    [FACTORED]: (k) => ({
      id: `compacter-${k}`, kind: 'compacter', reductionFactor: 16, n: 4, factorizedPhm: true, factorizedRule: false, activation: 'gelu_new', targets: out, seed: 500 + k,
    }),
    [MULTIPLIED]: (k) => ({
      id: `compacter-whole-${k}`, kind: 'compacter', reductionFactor: 16, n: 4, factorizedPhm: false, factorizedRule: false, activation: 'gelu_new', targets: out, seed: 800 + k,
    }),
    [LOW_RANK]: (k) => ({ id: `lowrank-${k}`, kind: 'low_rank_adapter', reductionFactor: 32, activation: 'gelu_new', targets: out, seed: 600 + k }),
    [LOW_RANK_MULTIPLIED]: (k) => ({ id: `lowrank-product-${k}`, kind: 'adapter', bottleneck: 24, activation: 'gelu_new', targets: out, seed: 900 + k }),
    'parallel adapter (bottleneck 24) on c_proj': (k) => ({ id: `parallel-${k}`, kind: 'parallel_adapter', bottleneck: 24, scaled: 1, activation: 'gelu_new', targets: out, seed: 700 + k }),
  };
}

/** Registers and loads deltas through the real registry, as the server would. */
async function loader(bb: Backbone) {
  const dir = await mkdtemp(join(tmpdir(), 'deltaserve-bench-kinds-'));
  const registry = await Registry.open({ dir: join(dir, 'deltas'), backbone: bb.info, cacheBytes: 2 ** 34 });
  return {
    load: async (spec: TaskSpec) => {
      await registry.register(spec.id, await writeDelta(join(dir, 'upload', spec.id), encodeTensors(deltaFiles(bb.info, spec))), { replace: false });
      return registry.load(spec.id);
    },
    remove: () => rm(dir, { recursive: true, force: true }),
  };
}

export async function measureKinds(bb: Backbone, session: ort.InferenceSession, sites: SiteLayout[], opts: KindsBenchOptions): Promise<KindsBenchResult> {
  if (opts.rounds * (opts.perBlock + 1) > STEPS_AT_CAPACITY) throw new Error(`at most ${STEPS_AT_CAPACITY} timed and warm-up steps per configuration`);
  const t0 = Date.now();
  const deltas = await loader(bb);
  try {
    const kinds = specs();
    // Distinct deltas per kind: 4, cycled over the rows (a batch of distinct deltas, without 224 registrations).
    const byKind = new Map<string, LoadedDelta[]>();
    for (const [label, spec] of Object.entries(kinds)) {
      byKind.set(label, await Promise.all([0, 1, 2, 3].map((k) => deltas.load(spec(k)))));
    }
    const r8 = await Promise.all(Array.from({ length: B }, (_, k) => deltas.load(kinds['LoRA r8 on c_attn'](10 + k))));
    const r64 = await deltas.load({ id: 'lora64', kind: 'peft-lora', rank: 64, targets: ['c_attn'], seed: 64 });
    opts.log(`  kinds: ${byKind.size * 4 + B + 1} deltas registered in ${((Date.now() - t0) / 1000).toFixed(0)} s`);

    const long = (delta: LoadedDelta | null) => ({ delta, maxNewTokens: 100_000 });
    const labels = [...byKind.keys()];
    const configs: Config[] = [
      { label: '32 r8 LoRA rows from the start', group: 'fallback', rows: r8.map(long) },
      { label: '32 r8 LoRA rows, a rank-64 row having left (the 32nd r8 row took its place)', group: 'fallback', rows: [...r8.slice(0, B - 1).map(long), { delta: r64, maxNewTokens: 2 }], joins: [r8[B - 1]] },
      { label: '31 r8 LoRA rows beside a rank-64 row (all fed rank 64)', group: 'fallback', rows: [...r8.slice(0, B - 1).map(long), long(r64)] },
      { label: '32 bare rows', group: 'kinds', rows: Array.from({ length: B }, () => long(null)) },
      ...labels.map((label): Config => ({ label: `32 rows: ${label}`, group: 'kinds', rows: Array.from({ length: B }, (_, r) => long(byKind.get(label)![r % 4])) })),
      ...([[FACTORED, MULTIPLIED], [MULTIPLIED, FACTORED]] as const).map(([compacter, without]): Config => {
        const mixed = labels.filter((l) => l !== without && l !== LOW_RANK_MULTIPLIED);
        return {
          label: `32 rows, every kind mixed row by row, the ${compacter === FACTORED ? 'factored' : 'multiplied-out'} compacter`,
          group: 'kinds', rows: Array.from({ length: B }, (_, r) => long(byKind.get(mixed[r % mixed.length])![Math.floor(r / mixed.length) % 4])),
        };
      }),
    ];

    const engines = await Promise.all(configs.map(async (c, i) => {
      const engine = new Engine(session, bb.io, sites, { maxBatch: B, prefillChunkTokens: 4096, eosTokenIds: [], maxPositions: bb.info.maxPositions });
      let rowId = 0;
      const add = (delta: LoadedDelta | null, maxNewTokens: number) => engine.add({
        rowId: rowId++, promptIds: Array.from({ length: PROMPT }, (_, t) => 32 + ((t * 7 + rowId * 13 + i) % 95)),
        sampling: { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null }, maxNewTokens, delta,
      });
      for (const r of c.rows) add(r.delta, r.maxNewTokens);
      // Untimed: prefill, the short rows leave, the joining rows prefill; until a pure decode step of 32 rows.
      for (let n = 0, joined = false; ; n++) {
        const s = await engine.step();
        if (!joined && c.joins && s.finished.length > 0) {
          for (const d of c.joins) add(d, 100_000);
          joined = true;
        }
        if (s.stats.decodeRows === B && s.stats.prefillRows === 0 && (joined || !c.joins)) break;
        if (n > 100) throw new Error(`${c.label}: never reached a decode step of ${B} rows`);
      }
      return engine;
    }));
    opts.log(`  kinds: ${configs.length} engines prefilled (${((Date.now() - t0) / 1000).toFixed(0)} s)`);

    const results: KindsConfigResult[] = configs.map((c) => ({ label: c.label, group: c.group, steps: [], loraRank: 0, bankBytes: 0 }));
    const cAttn = sites.find((s) => s.module.endsWith('h.0.attn.c_attn'))!.module;
    const capacity = engines[0].kvCapacity;
    // The two rank-8 configurations feed the same shapes: their steps alternate one by one (paired, so drift
    // cancels); every other configuration runs in a block of its own (alternating shapes would re-plan ORT).
    const blocks = [[0, 1], ...configs.slice(2).map((_, i) => [i + 2])];
    for (let round = 0; round < opts.rounds; round++) {
      for (const block of blocks) {
        for (let rep = 0; rep <= opts.perBlock; rep++) {
          for (const i of block) {
            const engine = engines[i];
            const t = performance.now();
            const s = await engine.step();
            const ms = performance.now() - t;
            if (s.stats.decodeRows !== B || s.stats.prefillRows !== 0 || engine.kvCapacity !== capacity) {
              throw new Error(`${configs[i].label}: a timed step was not a decode step of ${B} rows at capacity ${capacity}`);
            }
            if (rep > 0) results[i].steps.push(ms);
            results[i].loraRank = engine.fedRank(cAttn, 'lora');
            results[i].bankBytes = s.stats.bankBytes;
          }
        }
      }
    }
    const lowRank = await measureLowRank(opts);
    return { configs: results, lowRank, opts, seconds: (Date.now() - t0) / 1000 };
  } finally {
    await deltas.remove();
  }
}

/**
 * A low-rank adapter branch y + relu(y·W_d + b_d)·W_u + b_u at batch 32, each W = l·rᵀ of rank 1
 * (OpenDelta's LowRankLinear at low_rank_rank 1): multiplied out, each row's [768, 24] and
 * [24, 768] read from per-row banks; or factored, (y·l_d)·r_dᵀ and (z·l_u)·r_uᵀ. Run on 24 sets
 * of banks in turn, as a step runs one per c_proj of GPT-2 small, so the banks are read from
 * memory, not from a cache that one set would fit in.
 */
async function measureLowRank(opts: KindsBenchOptions): Promise<BranchResult[]> {
  const [hidden, bn] = [768, 24];
  const MODULES = 24;
  const y = new ort.Tensor('float32', rand(B * hidden, 1, 1), [B, 1, hidden]);
  const floats = (dims: number[], seed: number) => new ort.Tensor('float32', rand(dims.reduce((a, b) => a * b, 1), seed, 0.1), dims);
  const input = (g: GraphBuilder, name: string, dims: number[]) => g.input(name, DataType.FLOAT, dims);
  const branch = (project: (g: GraphBuilder, x: string, prefix: string, inF: number, outF: number) => string) => {
    const g = new GraphBuilder();
    const h = input(g, 'y', [B, 1, hidden]);
    const z = g.op('Relu', [g.op('Add', [project(g, h, 'down', hidden, bn), input(g, 'bd', [B, 1, bn])])]);
    g.output(g.opNamed('Add', [g.op('Add', [h, project(g, z, 'up', bn, hidden)]), input(g, 'bu', [B, 1, hidden])], 'out'), DataType.FLOAT, [B, 1, hidden]);
    return g;
  };
  const dense = branch((g, x, p, inF, outF) => g.op('MatMul', [x, input(g, `${p}_w`, [B, inF, outF])]));
  const factored = branch((g, x, p, inF, outF) => g.op('Mul', [g.op('MatMul', [x, input(g, `${p}_l`, [B, inF, 1])]), input(g, `${p}_r`, [B, 1, outF])]));
  const biases = (m: number) => ({ y, bd: floats([B, 1, bn], 10 * m + 3), bu: floats([B, 1, hidden], 10 * m + 5) });
  const cases = [
    {
      label: 'multiplied out (the adapter site\'s products)', graph: dense, floatsPerRow: 2 * hidden * bn + bn + hidden,
      feeds: Array.from({ length: MODULES }, (_, m) => ({ ...biases(m), down_w: floats([B, hidden, bn], 10 * m + 2), up_w: floats([B, bn, hidden], 10 * m + 4) })),
    },
    {
      label: 'factored (the low-rank adapter site\'s products, as served)', graph: factored, floatsPerRow: 2 * (hidden + bn) + bn + hidden,
      feeds: Array.from({ length: MODULES }, (_, m) => ({
        ...biases(m), down_l: floats([B, hidden, 1], 10 * m + 2), down_r: floats([B, 1, bn], 10 * m + 6), up_l: floats([B, bn, 1], 10 * m + 4), up_r: floats([B, 1, hidden], 10 * m + 7),
      })),
    },
  ];
  const sessions = await Promise.all(cases.map((c) => createSession(c.graph.encode(c.label))));
  const results: BranchResult[] = cases.map((c) => ({ label: c.label, floatsPerRow: c.floatsPerRow, runs: [] }));
  for (let round = 0; round < opts.rounds; round++) {
    for (const [i, s] of sessions.entries()) {
      await s.run(cases[i].feeds[0]);
      for (let rep = 0; rep < opts.perBlock; rep++) {
        // One "step": the branch on each of the 24 modules' banks.
        const t = performance.now();
        for (const f of cases[i].feeds) await s.run(f);
        results[i].runs.push(performance.now() - t);
      }
    }
  }
  for (const s of sessions) await s.release();
  return results;
}

const find = (res: KindsBenchResult, prefix: string) => res.configs.find((c) => c.label.startsWith(prefix))!;

export function kindsTables(res: KindsBenchResult): string {
  const steps = res.opts.rounds * res.opts.perBlock;
  const table = (group: KindsConfigResult['group'], base: KindsConfigResult) => mdTable(
    ['configuration (batch 32, decode step)', 'fed rank of c_attn\'s LoRA site', 'bank MiB', 'step ms (median)', 'step ms (min)', `÷ ${base.label} (median)`, '(min)'],
    res.configs.filter((c) => c.group === group).map((c) => [
      c.label, c.loraRank, fmt(c.bankBytes / 2 ** 20, 1), fmt(median(c.steps)), fmt(minimum(c.steps)),
      fmt(median(c.steps) / median(base.steps), 2), fmt(minimum(c.steps) / minimum(base.steps), 2),
    ]),
  );
  return [
    `${steps} timed Engine.step() calls per configuration (${res.opts.rounds} rounds × ${res.opts.perBlock}, each block after a warm-up step; ` +
    `the first two configurations' steps alternate one by one), KV capacity 64, ${PROMPT}-token prompts.`,
    table('fallback', find(res, '32 r8 LoRA rows from the start')),
    table('kinds', find(res, '32 bare rows')),
    'A low-rank adapter branch alone (768 features, bottleneck 24, rank-1 W = l·rᵀ; per-row banks, batch 32, one token per row), ' +
    `run on 24 sets of banks in turn as a step runs it on each c_proj (ms for all 24), ${res.lowRank[0].runs.length} times each:`,
    mdTable(['low-rank adapter branch × 24 modules', 'bank floats per row and module', 'ms (median)', 'ms (min)', '÷ multiplied out (median)'], res.lowRank.map((p) => [
      p.label, p.floatsPerRow, fmt(median(p.runs), 3), fmt(minimum(p.runs), 3), fmt(median(p.runs) / median(res.lowRank[0].runs), 2),
    ])),
  ].join('\n\n');
}

export function kindsGoals(res: KindsBenchResult) {
  const fresh = find(res, '32 r8 LoRA rows from the start');
  const after = find(res, '32 r8 LoRA rows, a rank-64 row having left');
  // The two ran step by step in alternation: each step's ratio to its partner cancels the drift between them.
  const paired = median(after.steps.map((ms, k) => ms / fresh.steps[k]));
  const rn = minimum(after.steps) / minimum(fresh.steps);
  const [fac, mul] = [find(res, '32 rows, every kind mixed row by row, the factored'), find(res, '32 rows, every kind mixed row by row, the multiplied-out')];
  const compacter = {
    what: 'Compacters served factored: batch-32 step, every kind mixed, factored ÷ multiplied-out compacter (issue 11; < 1 means factored is cheaper)',
    measured: `${fmt(median(fac.steps))} vs ${fmt(median(mul.steps))} ms (minima ${fmt(minimum(fac.steps))} vs ${fmt(minimum(mul.steps))}); banks ${fmt(fac.bankBytes / 2 ** 20, 1)} vs ${fmt(mul.bankBytes / 2 ** 20, 1)} MiB`,
    met: `${median(fac.steps) / median(mul.steps) < 1 ? 'yes' : '**no**'} (medians ${fmt(median(fac.steps) / median(mul.steps), 2)}), ${minimum(fac.steps) / minimum(mul.steps) < 1 ? 'yes' : '**no**'} (minima ${fmt(minimum(fac.steps) / minimum(mul.steps), 2)})`,
  };
  const [lr, lrm] = [find(res, `32 rows: ${LOW_RANK}`), find(res, `32 rows: ${LOW_RANK_MULTIPLIED}`)];
  const lowRank = {
    what: 'Low-rank adapters served factored: batch-32 step, 32 low-rank rows, factored ÷ multiplied out (issue 11; < 1 means factored is cheaper)',
    measured: `${fmt(median(lr.steps))} vs ${fmt(median(lrm.steps))} ms (minima ${fmt(minimum(lr.steps))} vs ${fmt(minimum(lrm.steps))}); banks ${fmt(lr.bankBytes / 2 ** 20, 1)} vs ${fmt(lrm.bankBytes / 2 ** 20, 1)} MiB`,
    met: `${median(lr.steps) / median(lrm.steps) < 1 ? 'yes' : '**no**'} (medians ${fmt(median(lr.steps) / median(lrm.steps), 2)}), ${minimum(lr.steps) / minimum(lrm.steps) < 1 ? 'yes' : '**no**'} (minima ${fmt(minimum(lr.steps) / minimum(lrm.steps), 2)})`,
  };
  return [{
    what: 'Banks: decode step at batch 32, 32 r8 rows after a rank-64 row left ≤ 1.05× 32 r8 rows from the start (issue 11)',
    measured: `${fmt(median(after.steps))} vs ${fmt(median(fresh.steps))} ms; median of paired step ratios ${fmt(paired, 2)}, minima ${fmt(rn, 2)}; fed rank ${after.loraRank}`,
    met: `${paired <= 1.05 ? 'yes' : '**no**'} (paired medians), ${rn <= 1.05 ? 'yes' : '**no**'} (minima)`,
  }, compacter, lowRank];
}
