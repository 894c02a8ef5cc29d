/**
 * The KV pool: capacity growth spread over steps (growAhead) must keep every
 * row's tokens exactly as a pool that grows all at once, through rows joining,
 * leaving and appending; and a generation crossing several buckets must equal
 * the model's full forward.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { buildEngineGraph } from '../src/backbone/rewrite/index.js';
import { planSites } from '../src/deltas/kinds/index.js';
import { createSession } from '../src/backbone/session.js';
import { Engine } from '../src/engine/engine.js';
import { KvPool } from '../src/engine/kv-pool.js';
import { demo, fullForwardGreedy, originalSession } from './helpers/engine-graph.js';

const shape = { layers: 3, kvHeads: 2, headDim: 4 };

/** Row b's valid tokens, layer by layer, as plain arrays. */
function contents(pool: KvPool, b: number): number[][] {
  const out: number[][] = [];
  const { kvHeads, headDim } = shape;
  for (const buf of [...pool.keys, ...pool.values]) {
    for (let h = 0; h < kvHeads; h++) {
      const off = (b * kvHeads + h) * pool.capacity * headDim;
      out.push(Array.from(buf.subarray(off, off + pool.len[b] * headDim)));
    }
  }
  return out;
}

test('spread growth keeps every row exactly as growing at once does', () => {
  let seed = 7;
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  const spread = new KvPool(shape, 8);
  const atOnce = new KvPool(shape, 8);
  const fresh = (rows: number, steps: number) => Array.from({ length: shape.layers }, () =>
    Float32Array.from({ length: rows * shape.kvHeads * steps * shape.headDim }, () => rand()));
  let spreadSwitches = 0;
  for (let step = 0; step < 400; step++) {
    const r = rand();
    if (spread.rows < 6 && (spread.rows === 0 || r < 0.05)) {
      // A row joins with a short prompt taken from a one-row source block.
      const tokens = 1 + Math.floor(rand() * 20);
      const src = { keys: fresh(1, tokens), values: fresh(1, tokens), capacity: tokens, row: 0, segments: [{ start: 0, tokens }] };
      spread.addRow(src);
      atOnce.addRow(src);
    } else if (spread.rows > 1 && r < 0.08) {
      const row = Math.floor(rand() * spread.rows);
      spread.removeRow(row);
      atOnce.removeRow(row);
    }
    const before = spread.capacity;
    spread.growAhead();
    if (spread.capacity > before) spreadSwitches++;
    spread.ensure(spread.rows, Math.max(...spread.len) + 1);
    atOnce.ensure(atOnce.rows, Math.max(...atOnce.len) + 1);
    const keys = fresh(spread.rows, 1);
    const values = fresh(spread.rows, 1);
    spread.append(keys, values);
    atOnce.append(keys, values);
    assert.deepEqual(spread.len, atOnce.len);
    for (let b = 0; b < spread.rows; b++) assert.deepEqual(contents(spread, b), contents(atOnce, b), `step ${step}, row ${b}`);
  }
  assert.ok(Math.max(...spread.len) > 128, 'rows grew past two buckets');
  assert.ok(spreadSwitches >= 2, `the spread copy switched buckets ${spreadSwitches} times`);
});

test('a greedy generation across three capacity buckets equals the full forward', async () => {
  const { bb } = await demo('demo:gpt2');
  const graph = buildEngineGraph(bb, planSites(bb));
  const engine = new Engine(await createSession(graph.bytes), bb.io, graph.sites, {
    maxBatch: 2, prefillChunkTokens: 512, eosTokenIds: [], maxPositions: bb.info.maxPositions,
  });
  const prompt = bb.tokenizer.encode('buckets');
  const n = 200;
  engine.add({ rowId: 1, promptIds: prompt, maxNewTokens: n, delta: null, sampling: { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: 0 } });
  const got: number[] = [];
  while (!engine.idle) got.push(...(await engine.step()).tokens.map((t) => t.token));
  assert.equal(got.length, n);

  // The reference: one full forward of the whole sequence on the original graph, each position's argmax.
  assert.deepEqual(got, await fullForwardGreedy(await originalSession(bb), bb.io, prompt, got));
});

test('capacity stops at the model\'s context less one, and packed past keeps each row\'s first tokens', () => {
  const pool = new KvPool(shape, Infinity, 100);
  pool.ensure(2, 90);
  assert.equal(pool.capacity, 100, 'the 128 bucket is capped at maxTokens');
  pool.addEmptyRow();
  pool.addEmptyRow();
  const { layers, kvHeads, headDim } = shape;
  const step = (v: number) => Array.from({ length: layers }, () => new Float32Array(2 * kvHeads * headDim).fill(v));
  for (let t = 1; t <= 100; t++) pool.append(step(t), step(t));
  assert.deepEqual(pool.len, [100, 100]);
  for (let n = 0; n < 30; n++) pool.growAhead();
  assert.equal(pool.capacity, 100, 'no growth past the cap');
  // One more step at the cap: no slot is written past the row (it is the row's last step).
  pool.append(step(999), step(999));
  assert.deepEqual(pool.len, [100, 100]);
  assert.ok(!pool.keys[0].includes(999));
  const packed = pool.pastPacked(0, 'key', 3);
  assert.equal(packed.length, 2 * kvHeads * 3 * headDim);
  assert.deepEqual(Array.from(packed.subarray(0, 3 * headDim)), [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]);
});
