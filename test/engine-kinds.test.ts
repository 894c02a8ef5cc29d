/**
 * Every kind served: the real Engine (real ORT, the default site plan, its
 * own KV cache and banks) generates greedily for each kind alone and for all
 * kinds mixed row by row with bare rows in one batch, and every row's tokens
 * equal greedy decoding of an independent reference — a separately built
 * model with that row's delta merged in or its ops built in — read off one
 * full forward pass. Also: a site's fed rank falls back when its largest-rank
 * row leaves (a LoRA's rank; a compacter's PHM rank and bottleneck block; a low-rank adapter's bottleneck), and the banks switch unused sites off without zero-size tensors
 * where a provider needs that.
 *
 * BACKBONES lists the demo families; a backbone with a reference builder of
 * its own (the torch-exported fixtures) joins by adding to it.
 */
import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import type { Backbone } from '../src/backbone/backbone.js';
import type { DemoSpec } from '../src/backbone/demo/spec.js';
import type { SiteLayout } from '../src/backbone/rewrite/delta-sites.js';
import { createSession } from '../src/backbone/session.js';
import type { LoadedDelta } from '../src/deltas/types.js';
import { bankBytesFor } from '../src/engine/bank-bytes.js';
import { Engine } from '../src/engine/engine.js';
import type { StepResult } from '../src/engine/protocol.js';
import {
  banksOf, defaultGraph, demo, emptyCache, everyKind, FAMILIES, fullForwardGreedy, loadCases, maxAbsDiff, referenceSession, row,
  runEngine, tokens, type KindCase, type Session,
} from './helpers/engine-graph.js';

const BACKBONES = FAMILIES;
const GREEDY = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null };
const NEW_TOKENS = 6;

interface Row {
  delta: LoadedDelta | null;
  promptIds: number[];
  maxNewTokens?: number;
}

/** Runs rows through an engine until it is idle; each row's tokens, and the steps. */
async function serve(engine: Engine, rows: Row[], onStep?: (s: StepResult) => void): Promise<{ tokens: number[][]; steps: StepResult[] }> {
  const out = rows.map(() => [] as number[]);
  rows.forEach((r, rowId) => engine.add({ rowId, promptIds: r.promptIds, sampling: GREEDY, maxNewTokens: r.maxNewTokens ?? NEW_TOKENS, delta: r.delta }));
  const steps: StepResult[] = [];
  while (!engine.idle) {
    const s = await engine.step();
    steps.push(s);
    for (const t of s.tokens) out[t.rowId].push(t.token);
    onStep?.(s);
  }
  return { tokens: out, steps };
}

for (const model of BACKBONES) {
  describe(`every kind served greedily on ${model}`, () => {
    let bb: Backbone;
    let spec: DemoSpec;
    let session: Session;
    let sites: SiteLayout[];
    let cases: KindCase[];
    const refs = new Map<string, Session>();
    const engine = (opts: { zeroSizeTensors?: boolean } = {}) => new Engine(session, bb.io, sites, {
      maxBatch: 32, prefillChunkTokens: 512, eosTokenIds: [], maxPositions: bb.info.maxPositions, ...opts,
    });
    const promptOf = (i: number) => tokens(4 + ((i * 5) % 9), 300 + i, bb.io.vocabSize);

    /** The tokens greedy decoding of `c`'s reference produces after `prompt`, checked against `got` position by position. */
    async function expectReference(c: KindCase | null, prompt: number[], got: number[], what: string) {
      const key = c?.spec.id ?? 'bare';
      if (!refs.has(key)) refs.set(key, await referenceSession(spec, c));
      assert.equal(got.length, NEW_TOKENS, `${what}: ${got.length} tokens`);
      assert.deepEqual(got, await fullForwardGreedy(refs.get(key)!, bb.io, prompt, got), `${what}: greedy tokens differ from the reference's`);
    }

    before(async () => {
      ({ bb, spec } = await demo(model));
      cases = await loadCases(bb, [...everyKind(bb), { id: 'lora64', kind: 'peft-lora', rank: 64, targets: everyKind(bb)[0].targets, seed: 64 }]);
      const g = defaultGraph(bb);
      sites = g.sites;
      session = await createSession(g.bytes);
    });

    test('each kind alone equals its reference, token for token', async () => {
      for (const [i, c] of cases.entries()) {
        const prompt = promptOf(i);
        const { tokens: [got] } = await serve(engine(), [{ delta: c.delta, promptIds: prompt }]);
        await expectReference(c, prompt, got, c.spec.id);
      }
    });

    test('every kind mixed row by row with bare rows in one batch equals each row\'s reference', async () => {
      const rows = [null, ...cases, null, ...cases.slice(0, 4)].map((c, i) => ({ c, row: { delta: c?.delta ?? null, promptIds: promptOf(i + 20) } }));
      const { tokens: got, steps } = await serve(engine(), rows.map((r) => r.row));
      const widest = Math.max(...steps.map((s) => s.stats.decodeRows));
      assert.equal(widest, rows.length, `a decode step ran all ${rows.length} rows together (widest: ${widest})`);
      for (const [i, r] of rows.entries()) await expectReference(r.c, r.row.promptIds, got[i], `row ${i} (${r.c?.spec.id ?? 'bare'})`);
      const outputs = new Set(got.map((t) => t.join(',')));
      assert.ok(outputs.size >= cases.length, `only ${outputs.size} distinct outputs`);
    });

    test('a site\'s fed rank falls back when the rank-64 row leaves, and the rows left still equal their references', async () => {
      const [lora4, lora64] = [cases.find((c) => c.spec.id === 'lora4')!, cases.find((c) => c.spec.id === 'lora64')!];
      const module = lora4.delta.sites[0].module;
      const e = engine();
      const ranks: number[] = [];
      const bytes: number[] = [];
      const rows: Row[] = [
        { delta: lora64.delta, promptIds: promptOf(40), maxNewTokens: 3 },
        ...Array.from({ length: 5 }, (_, i) => ({ delta: lora4.delta, promptIds: promptOf(41 + i) })),
      ];
      const { tokens: got } = await serve(e, rows, (s) => {
        // After each decode step that leaves rows running.
        if (s.stats.decodeRows === 0 || s.rows.length === 0) return;
        ranks.push(e.fedRank(module, 'lora'));
        bytes.push(s.stats.bankBytes);
      });
      assert.equal(ranks[0], 64, 'while the rank-64 row runs, the site is fed rank 64');
      assert.equal(ranks.at(-1), 4, 'after it left, rank 4');
      assert.ok(bytes.at(-1)! < bytes[0] / 4, `bank bytes ${bytes[0]} → ${bytes.at(-1)}`);
      for (let i = 1; i < rows.length; i++) await expectReference(lora4, rows[i].promptIds, got[i], `lora4 row ${i}`);
    });

    test('a compacter site\'s two padded axes (PHM rank, bottleneck block) follow its largest row and fall back when it leaves', async () => {
      const [small, large] = [cases.find((c) => c.spec.id === 'compacter')!, cases.find((c) => c.spec.id === 'compacter-r2')!];
      const module = large.delta.sites[0].module;
      assert.equal(large.delta.sites[0].site, 'compacter');
      assert.ok(small.delta.sites.some((s) => s.module === module && s.site === 'compacter'), 'both compacters are factored on one module');
      const e = engine();
      const fed: [number, number][] = [];
      const rows: Row[] = [
        { delta: large.delta, promptIds: promptOf(70), maxNewTokens: 3 },
        ...Array.from({ length: 4 }, (_, i) => ({ delta: small.delta, promptIds: promptOf(71 + i) })),
      ];
      const { tokens: got } = await serve(e, rows, (s) => {
        if (s.stats.decodeRows === 0 || s.rows.length === 0) return;
        fed.push([e.fedRank(module, 'compacter', 'phm_rank'), e.fedRank(module, 'compacter', 'block')]);
      });
      const axes = (c: KindCase) => c.delta.sites.find((s) => s.module === module)!.axes;
      assert.deepEqual(fed[0], [axes(large).phm_rank, axes(large).block], 'while the larger compacter runs, both axes are its');
      assert.deepEqual(fed.at(-1), [axes(small).phm_rank, axes(small).block], 'after it left, the smaller one\'s');
      assert.ok(axes(large).phm_rank > axes(small).phm_rank && axes(large).block > axes(small).block);
      for (let i = 1; i < rows.length; i++) await expectReference(small, rows[i].promptIds, got[i], `compacter row ${i}, padded then not`);
    });

    test('a low-rank adapter site\'s padded bottleneck follows its largest row and falls back when it leaves', async () => {
      const [small, wide] = [cases.find((c) => c.spec.id === 'low-rank')!, cases.find((c) => c.spec.id === 'low-rank-wide')!];
      const module = wide.delta.sites[0].module;
      assert.equal(wide.delta.sites[0].site, 'low_rank_adapter');
      assert.ok(small.delta.sites.some((s) => s.module === module && s.site === 'low_rank_adapter'), 'both low-rank adapters are factored on one module');
      const e = engine();
      const fed: number[] = [];
      const rows: Row[] = [
        { delta: wide.delta, promptIds: promptOf(80), maxNewTokens: 3 },
        ...Array.from({ length: 4 }, (_, i) => ({ delta: small.delta, promptIds: promptOf(81 + i) })),
      ];
      const { tokens: got } = await serve(e, rows, (s) => {
        if (s.stats.decodeRows === 0 || s.rows.length === 0) return;
        fed.push(e.fedRank(module, 'low_rank_adapter', 'bottleneck'));
      });
      const bottleneck = (c: KindCase) => c.delta.sites.find((s) => s.module === module)!.axes.bottleneck;
      assert.ok(bottleneck(wide) > bottleneck(small));
      assert.equal(fed[0], bottleneck(wide), 'while the wide adapter runs, the axis is its bottleneck');
      assert.equal(fed.at(-1), bottleneck(small), 'after it left, the smaller one\'s');
      for (let i = 1; i < rows.length; i++) await expectReference(small, rows[i].promptIds, got[i], `low-rank row ${i}, padded then not`);
    });

    test('the bank budget\'s projection (bankBytesFor) equals the bytes the banks hold, every kind mixed, compacters padded on both axes, low-rank adapters on their bottleneck', () => {
      const rows = [null, ...cases.map((c) => c.delta), null];
      assert.equal(bankBytesFor(sites, rows), banksOf(sites, rows).bytes);
    });

    test('where zero-size tensors are not allowed, unused sites are fed rank-1 slices: no zero dimension, the same logits, the same tokens', async () => {
      // The compacter and the wide low-rank adapter cover one output linear only: their sites are on there and idle on the other.
      const rows = [null, ...['ia3', 'compacter-r2', 'low-rank-wide'].map((id) => cases.find((c) => c.spec.id === id)!), null];
      const deltas = rows.map((c) => c?.delta ?? null);
      const ps = rows.map((_, b) => tokens(5, 500 + b, bb.io.vocabSize));
      const nonEmpty = banksOf(sites, deltas, false).feeds();
      const empty = Object.entries(nonEmpty).filter(([, t]) => t.dims.some((d) => d === 0)).map(([n]) => n);
      assert.deepEqual(empty, [], 'no feed has a zero dimension');
      const zeroSized = banksOf(sites, deltas, true).feeds();
      assert.ok(Object.values(zeroSized).some((t) => t.dims.some((d) => d === 0)), 'the CPU form does use zero-size ranks');
      const a = await runEngine(session, bb.io, { ids: ps, past: emptyCache(bb.io, rows.length) }, nonEmpty);
      const b = await runEngine(session, bb.io, { ids: ps, past: emptyCache(bb.io, rows.length) }, zeroSized);
      for (let r = 0; r < rows.length; r++) assert.ok(maxAbsDiff(row(a.logits, bb.io.vocabSize, r), row(b.logits, bb.io.vocabSize, r)) <= 1e-6, `row ${r}`);

      const served = await serve(engine({ zeroSizeTensors: false }), rows.map((c, i) => ({ delta: c?.delta ?? null, promptIds: promptOf(60 + i) })));
      for (const [i, c] of rows.entries()) await expectReference(c, promptOf(60 + i), served.tokens[i], `rank-1 form, row ${i}`);
    });
  });
}
