/**
 * The ORIGINAL (Optimum-layout) demo graphs, before any rewrite: incremental
 * decoding with the KV cache equals one full forward, and left-padded batch
 * rows equal each row alone.
 */
import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import type { Backbone } from '../src/backbone/backbone.js';
import {
  at, demo, emptyCache, FAMILIES, maxAbsDiff, originalSession, runOriginal, tokens, type KvCache, type Session,
} from './helpers/engine-graph.js';

const TOL = 1e-4;

/** Row b's slice of a cache, [1, heads, len, dim] per layer. */
function rowCache(c: KvCache, b: number): KvCache {
  const n = c.heads * c.len * c.dim;
  return { ...c, batch: 1, layers: c.layers.map((l) => ({ key: l.key.slice(b * n, (b + 1) * n), value: l.value.slice(b * n, (b + 1) * n) })) };
}

for (const model of FAMILIES) {
  describe(`original graph of ${model}`, () => {
    let bb: Backbone;
    let sess: Session;
    let V: number;

    before(async () => {
      ({ bb } = await demo(model));
      sess = await originalSession(bb);
      V = bb.io.vocabSize;
    });

    test('KV cache: prefill 3 then decode one token at a time equals one full forward at every position', async () => {
      const T = 9;
      const seqs = [tokens(T, 1, V), tokens(T, 2, V)];
      const full = await runOriginal(sess, bb.io, { ids: seqs, past: emptyCache(bb.io, 2) });
      assert.deepEqual(full.dims, [2, T, V]);
      let past = emptyCache(bb.io, 2);
      let worst = 0;
      for (let start = 0; start < T;) {
        const len = start === 0 ? 3 : 1;
        const out = await runOriginal(sess, bb.io, { ids: seqs.map((s) => s.slice(start, start + len)), past });
        // present = Concat(past, new): its first past.len positions are the past we fed.
        assert.equal(out.present.len, past.len + len);
        if (past.len) assert.equal(maxAbsDiff(rowCache(out.present, 0).layers[0].key.subarray(0, past.len * bb.io.headDim), rowCache(past, 0).layers[0].key.subarray(0, past.len * bb.io.headDim)), 0);
        for (let b = 0; b < 2; b++) {
          for (let t = 0; t < len; t++) {
            const d = maxAbsDiff(at(out.logits, len, V, b, t), at(full.logits, T, V, b, start + t));
            assert.ok(d <= TOL, `row ${b} position ${start + t}: max abs diff ${d}`);
            worst = Math.max(worst, d);
          }
        }
        past = out.present;
        start += len;
      }
      console.log(`# ${model} original graph, incremental vs full: max abs diff ${worst.toExponential(2)}`);
    });

    test('left-padded rows (mask zeros on the left, positions from the first real token) equal each row alone, prefill and decode', async () => {
      const lens = [3, 6, 8];
      const T = Math.max(...lens);
      const seqs = lens.map((n, b) => tokens(n + 1, 10 + b, V));
      const ids = seqs.map((s, b) => [...Array(T - lens[b]).fill(0), ...s.slice(0, lens[b])]);
      const mask = lens.map((n) => [...Array(T - n).fill(0), ...Array(n).fill(1)]);
      const pos = lens.map((n) => [...Array(T - n).fill(0), ...Array.from({ length: n }, (_, i) => i)]);
      const batch = await runOriginal(sess, bb.io, { ids, mask, pos, past: emptyCache(bb.io, 3) });
      // One decode step on top of the padded cache.
      const step = await runOriginal(sess, bb.io, {
        ids: seqs.map((s, b) => [s[lens[b]]]),
        mask: mask.map((m) => [...m, 1]),
        pos: lens.map((n) => [n]),
        past: batch.present,
      });
      let worst = 0;
      for (let b = 0; b < 3; b++) {
        const alone = await runOriginal(sess, bb.io, { ids: [seqs[b]], past: emptyCache(bb.io, 1) });
        const d1 = maxAbsDiff(at(batch.logits, T, V, b, T - 1), at(alone.logits, lens[b] + 1, V, 0, lens[b] - 1));
        const d2 = maxAbsDiff(at(step.logits, 1, V, b, 0), at(alone.logits, lens[b] + 1, V, 0, lens[b]));
        assert.ok(d1 <= TOL, `row ${b} (length ${lens[b]}) prefill: max abs diff ${d1}`);
        assert.ok(d2 <= TOL, `row ${b} (length ${lens[b]}) decode: max abs diff ${d2}`);
        worst = Math.max(worst, d1, d2);
      }
      console.log(`# ${model} original graph, left-padded vs alone: max abs diff ${worst.toExponential(2)}`);
    });
  });
}
