/**
 * Merged equivalence: one engine graph, a mixed batch (LoRA of two ranks,
 * adapters with every activation and different bottlenecks, BitFit, bare
 * rows, one delta on two rows), row by row equal to a separately built demo
 * model with that row's delta merged into its weights or built into its ops.
 */
import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import type { Backbone } from '../src/backbone/backbone.js';
import type { DemoSpec } from '../src/backbone/demo/spec.js';
import { buildEngineGraph } from '../src/backbone/rewrite/index.js';
import { createSession } from '../src/backbone/session.js';
import { DeltaBanks } from '../src/engine/banks.js';
import type { LoadedDelta } from '../src/deltas/types.js';
import {
  adapterDelta, at, bitfitDelta, concatCache, demo, emptyCache, FAMILIES, loraDelta, maxAbsDiff, mergedSession, modulesOf, originalSession,
  row, runEngine, runOriginal, targets, tokens, type Session,
} from './helpers/engine-graph.js';

const TOL = 1e-4;

for (const model of FAMILIES) {
  describe(`merged equivalence on ${model}`, () => {
    let bb: Backbone;
    let spec: DemoSpec;
    let engine: Session;
    let sites: ReturnType<typeof buildEngineGraph>['sites'];
    let deltas: Record<string, LoadedDelta>;
    const refs = new Map<string, Session>();
    /** The batch: one delta (or none) per row, by key of `deltas`. */
    const layout = ['lora4', 'bare', 'lora16', 'relu', 'bitfit', 'gelu', 'lora4', 'gelu_new', 'silu'];
    const S = 5;
    const prompts = layout.map((_, b) => tokens(S + 2, 100 + b, 384));
    const V = 384;

    before(async () => {
      ({ bb, spec } = await demo(model));
      const t = targets(bb);
      deltas = {
        lora4: loraDelta(bb, 'lora4', modulesOf(bb, t.lora4), 4, 1),
        lora16: loraDelta(bb, 'lora16', modulesOf(bb, t.lora16), 16, 2),
        relu: adapterDelta(bb, 'relu', modulesOf(bb, t.adapter), 4, 'relu', 3),
        gelu: adapterDelta(bb, 'gelu', modulesOf(bb, t.adapter).slice(0, 3), 8, 'gelu', 4),
        gelu_new: adapterDelta(bb, 'gelu_new', modulesOf(bb, t.adapter), 6, 'gelu_new', 5),
        silu: adapterDelta(bb, 'silu', modulesOf(bb, t.adapter).slice(2), 8, 'silu', 6),
        bitfit: bitfitDelta(bb, 'bitfit', modulesOf(bb, t.bitfit), 7),
      };
      const g = buildEngineGraph(bb);
      sites = g.sites;
      engine = await createSession(g.bytes);
      refs.set('bare', await mergedSession(spec, null));
      for (const [k, d] of Object.entries(deltas)) refs.set(k, await mergedSession(spec, d));
    });

    /** Last-position logits of the merged reference for `key` on one prompt, alone, one full forward. */
    async function reference(key: string, ids: number[]): Promise<Float32Array> {
      const out = await runOriginal(refs.get(key)!, bb.io, { ids: [ids], past: emptyCache(bb.io, 1) });
      return Float32Array.from(at(out.logits, ids.length, V, 0, ids.length - 1));
    }

    function banksFor(keys: string[]): DeltaBanks {
      const banks = new DeltaBanks(sites);
      keys.forEach((k, r) => banks.setRow(r, k === 'bare' ? null : deltas[k]));
      return banks;
    }

    test('the bare reference is the original model (the hooks add nothing by themselves)', async () => {
      const orig = await runOriginal(await originalSession(bb), bb.io, { ids: [prompts[0].slice(0, S)], past: emptyCache(bb.io, 1) });
      const ref = await reference('bare', prompts[0].slice(0, S));
      assert.equal(maxAbsDiff(at(orig.logits, S, V, 0, S - 1), ref), 0);
    });

    test('every delta changes the logits (so equality below means something)', async () => {
      const bare = await reference('bare', prompts[0].slice(0, S));
      for (const k of Object.keys(deltas)) {
        const d = maxAbsDiff(bare, await reference(k, prompts[0].slice(0, S)));
        assert.ok(d > 1e-2, `${k} moves the logits by only ${d}`);
      }
    });

    test('prefill of a mixed batch equals each row\'s merged model, row by row', async () => {
      const banks = banksFor(layout);
      const out = await runEngine(engine, bb.io, { ids: prompts.map((p) => p.slice(0, S)), past: emptyCache(bb.io, layout.length) }, banks.feeds(layout.length));
      let worst = 0;
      for (let b = 0; b < layout.length; b++) {
        const d = maxAbsDiff(row(out.logits, V, b), await reference(layout[b], prompts[b].slice(0, S)));
        assert.ok(d <= TOL, `row ${b} (${layout[b]}): max abs diff ${d}`);
        worst = Math.max(worst, d);
      }
      console.log(`# ${model} merged prefill: max abs diff ${worst.toExponential(2)} over ${layout.length} rows`);
    });

    test('decode steps with past (K/V concatenated by the test) equal the merged models\' full forward', async () => {
      const banks = banksFor(layout);
      const B = layout.length;
      let past = emptyCache(bb.io, B);
      let worst = 0;
      for (let len = S; len <= S + 2; len++) {
        const ids = len === S ? prompts.map((p) => p.slice(0, S)) : prompts.map((p) => [p[len - 1]]);
        const out = await runEngine(engine, bb.io, { ids, past }, banks.feeds(B));
        past = concatCache(past, out.fresh);
        for (let b = 0; b < B; b++) {
          const d = maxAbsDiff(row(out.logits, V, b), await reference(layout[b], prompts[b].slice(0, len)));
          assert.ok(d <= TOL, `length ${len}, row ${b} (${layout[b]}): max abs diff ${d}`);
          worst = Math.max(worst, d);
        }
      }
      assert.equal(past.len, S + 2);
      console.log(`# ${model} merged decode: max abs diff ${worst.toExponential(2)}`);
    });

    test('a batch whose rows all carry one LoRA (fed as one broadcast slice) equals the merged model', async () => {
      const keys = ['lora16', 'lora16', 'lora16', 'lora16'];
      const banks = banksFor(keys);
      const feeds = banks.feeds(keys.length);
      const a = Object.entries(feeds).find(([name, t]) => name.endsWith('.lora_a') && t.dims[2] > 0)!;
      assert.equal(a[1].dims[0], 1, `${a[0]} is one slice for the whole batch`);
      const ps = keys.map((_, b) => prompts[b].slice(0, S));
      const out = await runEngine(engine, bb.io, { ids: ps, past: emptyCache(bb.io, keys.length) }, feeds);
      for (let b = 0; b < keys.length; b++) {
        const d = maxAbsDiff(row(out.logits, V, b), await reference('lora16', ps[b]));
        assert.ok(d <= TOL, `row ${b}: max abs diff ${d}`);
      }
    });

    test('after rows leave and a row changes delta, the banks still give each row its own delta', async () => {
      const keys = [...layout];
      const banks = banksFor(keys);
      // removeRow moves the last row into the hole, as the KV pool compacts.
      banks.removeRow(0);
      keys[0] = keys.pop()!;
      banks.removeRow(3);
      keys[3] = keys.pop()!;
      banks.setRow(1, deltas.lora16); // bare → a rank-16 LoRA
      keys[1] = 'lora16';
      banks.setRow(2, null); // lora16 → bare
      keys[2] = 'bare';
      const B = keys.length;
      const ps = keys.map((_, b) => prompts[b].slice(0, S));
      const out = await runEngine(engine, bb.io, { ids: ps, past: emptyCache(bb.io, B) }, banks.feeds(B));
      for (let b = 0; b < B; b++) {
        const d = maxAbsDiff(row(out.logits, V, b), await reference(keys[b], ps[b]));
        assert.ok(d <= TOL, `row ${b} (${keys[b]}): max abs diff ${d}`);
      }
    });
  });
}
