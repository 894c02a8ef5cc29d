/**
 * Merged equivalence, every kind: one engine graph, a batch mixing a delta of
 * every kind row by row (LoRA of two ranks and formats, adapters with every
 * activation, BitFit, IA³ on inputs and outputs, compacters in both PHM
 * forms, a low-rank adapter, a parallel adapter) with bare rows and one delta
 * on two rows, each row's logits equal to a separately built demo model with
 * that row's delta merged into its weights or its ops built in
 * (test/helpers/kind-cases.ts computes those from the delta's own files).
 */
import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import type { Backbone } from '../src/backbone/backbone.js';
import type { DemoSpec } from '../src/backbone/demo/spec.js';
import type { SiteLayout } from '../src/backbone/rewrite/delta-sites.js';
import { createSession } from '../src/backbone/session.js';
import {
  at, banksOf, concatCache, defaultGraph, demo, emptyCache, everyKind, FAMILIES, loadCases, maxAbsDiff, originalSession, referenceSession,
  row, runEngine, runOriginal, tokens, type KindCase, type Session,
} from './helpers/engine-graph.js';

const TOL = 1e-4;

for (const model of FAMILIES) {
  describe(`merged equivalence of every kind on ${model}`, () => {
    let bb: Backbone;
    let spec: DemoSpec;
    let engine: Session;
    let sites: SiteLayout[];
    const cases = new Map<string, KindCase>();
    const refs = new Map<string, Session>();
    /** The batch: one delta (or none) per row, by case id. */
    let layout: string[];
    const S = 5;
    const V = 384;
    let prompts: number[][];

    before(async () => {
      ({ bb, spec } = await demo(model));
      for (const c of await loadCases(bb, everyKind(bb))) cases.set(c.spec.id, c);
      const ids = [...cases.keys()];
      layout = [ids[0], 'bare', ...ids.slice(1, 6), 'bare', ...ids.slice(6), ids[0]];
      prompts = layout.map((_, b) => tokens(S + 2, 100 + b, V));
      const g = defaultGraph(bb);
      sites = g.sites;
      engine = await createSession(g.bytes);
      refs.set('bare', await referenceSession(spec, null));
      for (const [id, c] of cases) refs.set(id, await referenceSession(spec, c));
    });

    /** Last-position logits of the reference for `key` on one prompt, alone, one full forward. */
    async function reference(key: string, ids: number[]): Promise<Float32Array> {
      const out = await runOriginal(refs.get(key)!, bb.io, { ids: [ids], past: emptyCache(bb.io, 1) });
      return Float32Array.from(at(out.logits, ids.length, V, 0, ids.length - 1));
    }

    const banksFor = (keys: string[]) => banksOf(sites, keys.map((k) => (k === 'bare' ? null : cases.get(k)!.delta)));

    test('every kind is in the batch, and the bare reference is the original model', async () => {
      assert.deepEqual(new Set([...cases.values()].map((c) => c.delta.type)),
        new Set(['lora', 'adapter', 'bitfit', 'ia3', 'compacter', 'low_rank_adapter', 'parallel_adapter']));
      // Compacters are served factored through their own site where it serves them (n 4, W_left·W_right), multiplied out otherwise.
      const siteOf = (id: string) => new Set(cases.get(id)!.delta.sites.map((s) => s.site));
      assert.deepEqual(siteOf('compacter'), new Set(['compacter']));
      assert.deepEqual(siteOf('compacter-r2'), new Set(['compacter']));
      assert.deepEqual(siteOf('compacter-full'), new Set(['adapter']));
      // Low-rank adapters are served factored through theirs.
      assert.deepEqual(siteOf('low-rank'), new Set(['low_rank_adapter']));
      assert.deepEqual(siteOf('low-rank-wide'), new Set(['low_rank_adapter']));
      const orig = await runOriginal(await originalSession(bb), bb.io, { ids: [prompts[0].slice(0, S)], past: emptyCache(bb.io, 1) });
      assert.equal(maxAbsDiff(at(orig.logits, S, V, 0, S - 1), await reference('bare', prompts[0].slice(0, S))), 0);
    });

    test('every delta changes the logits (so equality below means something)', async () => {
      const bare = await reference('bare', prompts[0].slice(0, S));
      for (const k of cases.keys()) {
        const d = maxAbsDiff(bare, await reference(k, prompts[0].slice(0, S)));
        assert.ok(d > 1e-2, `${k} moves the logits by only ${d}`);
      }
    });

    test('prefill and decode of the mixed batch equal each row\'s reference, row by row', async () => {
      const banks = banksFor(layout);
      const B = layout.length;
      let past = emptyCache(bb.io, B);
      let worst = 0;
      for (let len = S; len <= S + 2; len++) {
        const ids = len === S ? prompts.map((p) => p.slice(0, S)) : prompts.map((p) => [p[len - 1]]);
        const out = await runEngine(engine, bb.io, { ids, past }, banks.feeds());
        past = concatCache(past, out.fresh);
        for (let b = 0; b < B; b++) {
          const d = maxAbsDiff(row(out.logits, V, b), await reference(layout[b], prompts[b].slice(0, len)));
          assert.ok(d <= TOL, `length ${len}, row ${b} (${layout[b]}): max abs diff ${d}`);
          worst = Math.max(worst, d);
        }
      }
      console.log(`# ${model} every kind mixed, prefill + 2 decode steps: max abs diff ${worst.toExponential(2)} over ${B} rows`);
    });

    test('a batch whose rows all carry one delta (fed as one broadcast slice) equals its reference, for every kind', async () => {
      for (const id of cases.keys()) {
        const keys = [id, id, id];
        const feeds = banksFor(keys).feeds();
        const fed = Object.entries(feeds).filter(([name, t]) => name.startsWith('delta.') && t.dims.length === 3 && t.dims.every((d) => d > 0));
        assert.ok(fed.every(([, t]) => t.dims[0] === 1), `${id}: every bank is one slice for the whole batch`);
        const ps = keys.map((_, b) => prompts[b].slice(0, S));
        const out = await runEngine(engine, bb.io, { ids: ps, past: emptyCache(bb.io, keys.length) }, feeds);
        for (let b = 0; b < keys.length; b++) {
          const d = maxAbsDiff(row(out.logits, V, b), await reference(id, ps[b]));
          assert.ok(d <= TOL, `${id}, row ${b}: max abs diff ${d}`);
        }
      }
    });

    test('after rows leave and join, the banks still give each row its own delta', async () => {
      const keys = [...layout];
      const banks = banksFor(keys);
      // remove moves the last row into the hole, as the KV pool compacts.
      for (const i of [0, 3, 5]) {
        banks.remove(i);
        keys[i] = keys.pop()!;
      }
      for (const k of ['lora16', 'bare', 'compacter']) {
        banks.add(k === 'bare' ? null : cases.get(k)!.delta);
        keys.push(k);
      }
      const B = keys.length;
      const ps = keys.map((_, b) => prompts[b].slice(0, S));
      const out = await runEngine(engine, bb.io, { ids: ps, past: emptyCache(bb.io, B) }, banks.feeds());
      for (let b = 0; b < B; b++) {
        const d = maxAbsDiff(row(out.logits, V, b), await reference(keys[b], ps[b]));
        assert.ok(d <= TOL, `row ${b} (${keys[b]}): max abs diff ${d}`);
      }
    });
  });
}
