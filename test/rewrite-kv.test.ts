/**
 * The ENGINE graph's KV cache: it returns only the step's new K/V, the test
 * concatenates past + new itself and feeds it back; each step's last logits
 * must equal one full forward of an independent graph (the original, or the
 * delta-merged reference model) — bare, with deltas attached, and with
 * left-padded rows.
 */
import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import type { Backbone } from '../src/backbone/backbone.js';
import type { DemoSpec } from '../src/backbone/demo/spec.js';
import type { SiteLayout } from '../src/backbone/rewrite/delta-sites.js';
import { buildEngineGraph } from '../src/backbone/rewrite/index.js';
import { createSession } from '../src/backbone/session.js';
import type { DeltaBanks } from '../src/engine/banks.js';
import {
  at, banksOf, concatCache, defaultGraph, demo, emptyCache, everyKind, FAMILIES, loadCases, maxAbsDiff, originalSession, referenceSession,
  row, runEngine, runOriginal, tokens, type KindCase, type Session,
} from './helpers/engine-graph.js';

const TOL = 1e-4;

for (const model of FAMILIES) {
  describe(`engine graph KV cache on ${model}`, () => {
    let bb: Backbone;
    let spec: DemoSpec;
    let V: number;
    let engine: Session;
    let sites: SiteLayout[];
    let splitLayers: number;
    let original: Session;
    let cases: Map<string, KindCase>;

    before(async () => {
      ({ bb, spec } = await demo(model));
      V = bb.io.vocabSize;
      cases = new Map((await loadCases(bb, everyKind(bb))).map((c) => [c.spec.id, c]));
      const g = defaultGraph(bb);
      sites = g.sites;
      splitLayers = g.splitLayers;
      engine = await createSession(g.bytes);
      original = await originalSession(bb);
    });

    test('the attention rewrite engaged on every layer (no O(context) Concat left)', () => {
      assert.equal(splitLayers, bb.io.layers);
    });

    /**
     * Prefill 3 tokens, then one token at a time, past = the test's own
     * concatenation of every step's new K/V; each step's logits against
     * `expected(row, length)`.
     */
    async function decodeAndCompare(
      seqs: number[][], banks: DeltaBanks | null, expected: (b: number, len: number) => Promise<Float32Array> | Float32Array,
    ): Promise<number> {
      const B = seqs.length;
      const T = seqs[0].length;
      let past = emptyCache(bb.io, B);
      let worst = 0;
      for (let start = 0; start < T;) {
        const len = start === 0 ? 3 : 1;
        const out = await runEngine(engine, bb.io, { ids: seqs.map((s) => s.slice(start, start + len)), past }, banks?.feeds() ?? {});
        assert.equal(out.fresh.len, len, 'the engine returns only this step\'s K/V');
        past = concatCache(past, out.fresh);
        start += len;
        for (let b = 0; b < B; b++) {
          const d = maxAbsDiff(row(out.logits, V, b), await expected(b, start));
          assert.ok(d <= TOL, `row ${b}, length ${start}: max abs diff ${d}`);
          worst = Math.max(worst, d);
        }
      }
      return worst;
    }

    test('bare: incremental decoding equals the original graph\'s full forward at every step', async () => {
      const T = 9;
      const seqs = [tokens(T, 21, V), tokens(T, 22, V)];
      const full = await runOriginal(original, bb.io, { ids: seqs, past: emptyCache(bb.io, 2) });
      // Without any delta feeds at all: a graph built with no sites.
      const noSites = await createSession(buildEngineGraph(bb, new Map()).bytes);
      const saved = engine;
      engine = noSites;
      const w1 = await decodeAndCompare(seqs, null, (b, len) => at(full.logits, T, V, b, len - 1));
      engine = saved;
      // With every default site, fed empty.
      const w2 = await decodeAndCompare(seqs, banksOf(sites, [null, null]), (b, len) => at(full.logits, T, V, b, len - 1));
      console.log(`# ${model} engine bare, incremental vs original full forward: no sites ${w1.toExponential(2)}, all sites empty ${w2.toExponential(2)}`);
    });

    test('with deltas attached (LoRA, adapter, BitFit, IA³, compacter, parallel adapter, bare rows): incremental decoding equals each reference\'s full forward', async () => {
      const rows = ['lora16', 'gelu_new', null, 'bitfit', 'ia3', 'compacter', 'parallel', 'lora4'].map((k) => (k ? cases.get(k)! : null));
      const T = 8;
      const seqs = rows.map((_, b) => tokens(T, 40 + b, V));
      const fulls: Float32Array[] = [];
      for (const c of rows) {
        const ref = await referenceSession(spec, c);
        fulls.push((await runOriginal(ref, bb.io, { ids: [seqs[fulls.length]], past: emptyCache(bb.io, 1) })).logits);
      }
      const banks = banksOf(sites, rows.map((c) => c?.delta ?? null));
      const worst = await decodeAndCompare(seqs, banks, (b, len) => at(fulls[b], T, V, 0, len - 1));
      console.log(`# ${model} engine with deltas, incremental vs merged full forward: max abs diff ${worst.toExponential(2)}`);
    });

    test('left-padded rows with deltas: prefill and two decode steps equal each row alone in its reference', async () => {
      const rows = [cases.get('relu')!, null, cases.get('lora16')!];
      const lens = [2, 7, 4];
      const T = Math.max(...lens);
      const seqs = lens.map((n, b) => tokens(n + 2, 60 + b, V));
      const banks = banksOf(sites, rows.map((c) => c?.delta ?? null));
      let mask = lens.map((n) => [...Array(T - n).fill(0), ...Array(n).fill(1)]);
      let past = emptyCache(bb.io, 3);
      let worst = 0;
      for (let step = 0; step < 3; step++) {
        const ids = step === 0
          ? seqs.map((s, b) => [...Array(T - lens[b]).fill(0), ...s.slice(0, lens[b])])
          : seqs.map((s, b) => [s[lens[b] + step - 1]]);
        if (step > 0) mask = mask.map((m) => [...m, 1]);
        const pos = step === 0
          ? lens.map((n) => [...Array(T - n).fill(0), ...Array.from({ length: n }, (_, i) => i)])
          : lens.map((n) => [n + step - 1]);
        const out = await runEngine(engine, bb.io, { ids, mask, pos, past }, banks.feeds());
        past = concatCache(past, out.fresh);
        for (let b = 0; b < 3; b++) {
          const n = lens[b] + step;
          const ref = await referenceSession(spec, rows[b]);
          const alone = await runOriginal(ref, bb.io, { ids: [seqs[b].slice(0, n)], past: emptyCache(bb.io, 1) });
          const d = maxAbsDiff(row(out.logits, V, b), at(alone.logits, n, V, 0, n - 1));
          assert.ok(d <= TOL, `step ${step}, row ${b} (length ${n}): max abs diff ${d}`);
          worst = Math.max(worst, d);
        }
      }
      console.log(`# ${model} engine left-padded with deltas vs alone: max abs diff ${worst.toExponential(2)}`);
    });
  });
}
