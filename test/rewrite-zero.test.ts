/**
 * Zero deltas: the engine graph with every default site fed empty equals the
 * same engine built with no sites (≤ 1e-6) and the original graph's
 * last-position logits (≤ 1e-4); bare rows beside delta rows are untouched.
 */
import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import type { Backbone } from '../src/backbone/backbone.js';
import { bankInput, type SiteLayout } from '../src/backbone/rewrite/delta-sites.js';
import { buildEngineGraph } from '../src/backbone/rewrite/index.js';
import { createSession } from '../src/backbone/session.js';
import {
  at, banksOf, concatCache, defaultGraph, demo, emptyCache, everyKind, FAMILIES, loadCases, maxAbsDiff, originalSession,
  row, runEngine, runOriginal, tokens, type Session,
} from './helpers/engine-graph.js';

for (const model of FAMILIES) {
  describe(`zero deltas on ${model}`, () => {
    let bb: Backbone;
    let V: number;
    let engine: Session;
    let sites: SiteLayout[];
    let noSites: Session;
    let original: Session;

    before(async () => {
      ({ bb } = await demo(model));
      V = bb.io.vocabSize;
      const g = defaultGraph(bb);
      sites = g.sites;
      engine = await createSession(g.bytes);
      const bare = buildEngineGraph(bb, new Map());
      assert.equal(bare.sites.length, 0);
      noSites = await createSession(bare.bytes);
      original = await originalSession(bb);
    });

    test('default plan: lora and bias on every linear but lm_head, adapters, compacters and low-rank adapters on block outputs, ia3 where PEFT puts it', () => {
      const expected = bb.info.modules.filter((m) => !m.name.endsWith('lm_head')).map((m) => m.name).sort();
      assert.deepEqual(sites.map((s) => s.module).sort(), expected);
      const blockOutput = /(attn\.c_proj|mlp\.c_proj|self_attn\.o_proj|mlp\.down_proj)$/;
      const ia3 = /(c_attn|mlp\.c_proj|k_proj|v_proj|down_proj)$/;
      for (const s of sites) {
        const out = blockOutput.test(s.module);
        const want = ['lora', ...(out ? ['adapter'] : []), 'bias', ...(ia3.test(s.module) ? ['ia3'] : []), ...(out ? ['compacter', 'low_rank_adapter'] : [])];
        assert.deepEqual(s.sites, want, s.module);
      }
      assert.ok(sites.some((s) => s.sites.includes('adapter')), 'some module carries adapter sites');
    });

    test('every site fed empty equals no sites (≤ 1e-6) and the original last logits (≤ 1e-4), prefill and decode', async () => {
      const B = 3;
      const S = 6;
      const seqs = Array.from({ length: B }, (_, b) => tokens(S + 1, 70 + b, V));
      const feeds = banksOf(sites, Array(B).fill(null)).feeds();
      // Unused sites are fed a zero-size rank, so ORT skips their MatMuls.
      assert.deepEqual(feeds[bankInput(sites[0].module, 'lora_a')].dims, [1, sites[0].inFeatures, 0]);
      const full = await runOriginal(original, bb.io, { ids: seqs, past: emptyCache(bb.io, B) });
      let past = emptyCache(bb.io, B);
      let pastBare = emptyCache(bb.io, B);
      let vsBare = 0;
      let vsOrig = 0;
      let kvBare = 0;
      for (const [start, len] of [[0, S], [S, 1]]) {
        const ids = seqs.map((s) => s.slice(start, start + len));
        const a = await runEngine(engine, bb.io, { ids, past }, feeds);
        const b = await runEngine(noSites, bb.io, { ids, past: pastBare });
        vsBare = Math.max(vsBare, maxAbsDiff(a.logits, b.logits));
        for (let l = 0; l < bb.io.layers; l++) {
          kvBare = Math.max(kvBare, maxAbsDiff(a.fresh.layers[l].key, b.fresh.layers[l].key), maxAbsDiff(a.fresh.layers[l].value, b.fresh.layers[l].value));
        }
        for (let r = 0; r < B; r++) vsOrig = Math.max(vsOrig, maxAbsDiff(row(a.logits, V, r), at(full.logits, S + 1, V, r, start + len - 1)));
        past = concatCache(past, a.fresh);
        pastBare = concatCache(pastBare, b.fresh);
      }
      console.log(`# ${model} zero deltas: vs no-site engine ${vsBare.toExponential(2)} (new K/V ${kvBare.toExponential(2)}), vs original ${vsOrig.toExponential(2)}`);
      assert.ok(vsBare <= 1e-6, `vs the engine without sites: ${vsBare}`);
      assert.ok(kvBare <= 1e-6, `new K/V vs the engine without sites: ${kvBare}`);
      assert.ok(vsOrig <= 1e-4, `vs the original graph: ${vsOrig}`);
    });

    test('bare rows in a batch where other rows carry deltas of every kind are unchanged (≤ 1e-6 vs the engine without sites)', async () => {
      const deltas = (await loadCases(bb, everyKind(bb))).map((c) => c.delta);
      const rows = deltas.flatMap((d) => [d, null]);
      const B = rows.length;
      const seqs = Array.from({ length: B }, (_, b) => tokens(5, 90 + b, V));
      const a = await runEngine(engine, bb.io, { ids: seqs, past: emptyCache(bb.io, B) }, banksOf(sites, rows).feeds());
      const b = await runEngine(noSites, bb.io, { ids: seqs, past: emptyCache(bb.io, B) });
      let worst = 0;
      let moved = Infinity;
      for (let r = 0; r < B; r++) {
        const d = maxAbsDiff(row(a.logits, V, r), row(b.logits, V, r));
        if (rows[r]) moved = Math.min(moved, d);
        else worst = Math.max(worst, d);
      }
      console.log(`# ${model} bare rows beside delta rows: ${worst.toExponential(2)} (delta rows moved ≥ ${moved.toExponential(2)})`);
      assert.ok(worst <= 1e-6, `bare rows: ${worst}`);
      assert.ok(moved > 1e-2, 'the delta rows did change');
    });
  });
}
