import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRng } from '../src/engine/rng.js';
import { RowSampler, applyRepetitionPenalty, argmax, type SamplerParams } from '../src/engine/sampler.js';

const GREEDY: SamplerParams = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null };

/** Logits from a seeded generator, so every test sees the same varied row. */
function randomLogits(vocab: number, seed: number, scale = 4): Float32Array {
  const rng = createRng(seed);
  return Float32Array.from({ length: vocab }, () => (rng.next() * 2 - 1) * scale);
}

/** Softmax of logits/temperature over the given ids, in the test's own double arithmetic. */
function softmaxOver(logits: ArrayLike<number>, ids: number[], temperature: number): Map<number, number> {
  const max = Math.max(...ids.map((i) => logits[i]));
  const w = ids.map((i) => Math.exp((logits[i] - max) / temperature));
  const z = w.reduce((a, b) => a + b, 0);
  return new Map(ids.map((id, j) => [id, w[j] / z]));
}

/** Ids sorted by logit, best first (the test's independent reference ordering). */
function ranked(logits: ArrayLike<number>): number[] {
  return Array.from({ length: logits.length }, (_, i) => i).sort((a, b) => logits[b] - logits[a] || a - b);
}

function nucleus(logits: ArrayLike<number>, temperature: number, topP: number, candidates = ranked(logits)): Map<number, number> {
  const probs = softmaxOver(logits, candidates, temperature);
  const kept: number[] = [];
  let cumulative = 0;
  for (const id of candidates) {
    kept.push(id);
    cumulative += probs.get(id)!;
    if (cumulative >= topP) break;
  }
  return softmaxOver(logits, kept, temperature);
}

function frequencies(draws: number[]): Map<number, number> {
  const counts = new Map<number, number>();
  for (const d of draws) counts.set(d, (counts.get(d) ?? 0) + 1);
  return new Map([...counts].map(([id, c]) => [id, c / draws.length]));
}

function assertDistribution(empirical: Map<number, number>, expected: Map<number, number>, tolerance: number): void {
  for (const id of empirical.keys()) assert.ok(expected.has(id), `sampled ${id}, which is outside the allowed set`);
  for (const [id, p] of expected) {
    const f = empirical.get(id) ?? 0;
    assert.ok(Math.abs(f - p) <= tolerance, `id ${id}: frequency ${f.toFixed(4)} vs probability ${p.toFixed(4)}`);
  }
}

function drawMany(params: SamplerParams, logits: Float32Array, n: number, offset = 0, vocab = logits.length): number[] {
  const sampler = new RowSampler(params, []);
  return Array.from({ length: n }, () => sampler.sample(logits, offset, vocab));
}

test('rng: same seed, same sequence; different seed, different; floats in [0,1) and uniform', () => {
  const a = createRng(42);
  const b = createRng(42);
  const c = createRng(43);
  const sa = Array.from({ length: 1000 }, () => a.next());
  const sb = Array.from({ length: 1000 }, () => b.next());
  const sc = Array.from({ length: 1000 }, () => c.next());
  assert.deepEqual(sa, sb);
  assert.notDeepEqual(sa, sc);
  assert.ok(sa.every((x) => x >= 0 && x < 1));
  assert.equal(createRng(7).seed, 7n);
  assert.notEqual(createRng(null).seed, createRng(null).seed);
  assert.notDeepEqual(
    Array.from({ length: 4 }, createRng(0.5).next.bind(createRng(0.5))),
    Array.from({ length: 4 }, createRng(0).next.bind(createRng(0))),
  );

  const rng = createRng(1);
  const bins = new Array(10).fill(0);
  const n = 100_000;
  for (let i = 0; i < n; i++) bins[Math.floor(rng.next() * 10)]++;
  for (const count of bins) assert.ok(Math.abs(count / n - 0.1) < 0.005, `bin frequency ${count / n}`);
});

test('greedy = argmax computed here, on a row inside a batch buffer; ties go to the lowest id', () => {
  const vocab = 1000;
  const batch = randomLogits(vocab * 3, 5);
  for (let row = 0; row < 3; row++) {
    const slice = Array.from(batch.subarray(row * vocab, (row + 1) * vocab));
    const expected = slice.indexOf(Math.max(...slice));
    assert.equal(new RowSampler(GREEDY, []).sample(batch, row * vocab, vocab), expected);
  }
  const tied = new Float32Array([1, 5, 3, 5, 5]);
  assert.equal(argmax(tied, 0, 5), 1);
  assert.equal(new RowSampler(GREEDY, []).sample(tied, 0, 5), 1);
  // top_k 1 is greedy whatever the temperature.
  assert.equal(new RowSampler({ ...GREEDY, temperature: 2, topK: 1, seed: 3 }, []).sample(tied, 0, 5), 1);
  assert.equal(argmax(new Float32Array([NaN, -1, NaN]), 0, 3), 1);
});

test('top-k never returns an id outside the k best, and matches their renormalised softmax', () => {
  const vocab = 5000;
  const logits = randomLogits(vocab, 11, 3);
  const k = 8;
  const best = ranked(logits).slice(0, k);
  const draws = drawMany({ temperature: 0.7, topK: k, topP: 1, repetitionPenalty: 1, seed: 1 }, logits, 20_000);
  assert.ok(draws.every((d) => best.includes(d)));
  assertDistribution(frequencies(draws), softmaxOver(logits, best, 0.7), 0.015);
});

test('top-k keeps the lowest ids among equal logits at the boundary', () => {
  const logits = new Float32Array([0, 2, 1, 1, 1, 1]);
  const draws = drawMany({ temperature: 1, topK: 3, topP: 1, repetitionPenalty: 1, seed: 9 }, logits, 2000);
  assert.deepEqual([...new Set(draws)].sort(), [1, 2, 3]);
});

test('top-p alone: empirical frequencies match the renormalised nucleus computed here', () => {
  const vocab = 8000;
  const logits = randomLogits(vocab, 21, 1);
  // A peaked head over a flat tail, as real logits look.
  const head = [17, 4242, 3137, 7999, 9, 123];
  head.forEach((id, j) => (logits[id] = 12 - j * 0.6));
  const expected = nucleus(logits, 1, 0.8);
  assert.ok(expected.size > 1 && expected.size < 20, `nucleus of ${expected.size}`);
  const draws = drawMany({ temperature: 1, topK: 0, topP: 0.8, repetitionPenalty: 1, seed: 2 }, logits, 20_000);
  assertDistribution(frequencies(draws), expected, 0.015);
});

test('top-p on a flat row reaches deep into the vocab and still matches', () => {
  const logits = randomLogits(300, 8, 0.5);
  const expected = nucleus(logits, 1.3, 0.5);
  assert.ok(expected.size > 50, `nucleus of ${expected.size}`);
  const draws = drawMany({ temperature: 1.3, topK: 0, topP: 0.5, repetitionPenalty: 1, seed: 4 }, logits, 20_000);
  assertDistribution(frequencies(draws), expected, 0.006);
});

test('top-p after top-k: the nucleus is taken over the k survivors, renormalised', () => {
  const logits = new Float32Array([3, 0, 2.5, 1, 2, -1, 1.5, 0.5]);
  const k = 4;
  const expected = nucleus(logits, 1, 0.75, ranked(logits).slice(0, k));
  assert.deepEqual([...expected.keys()].sort(), [0, 2, 4]);
  const draws = drawMany({ temperature: 1, topK: k, topP: 0.75, repetitionPenalty: 1, seed: 6 }, logits, 20_000);
  assertDistribution(frequencies(draws), expected, 0.015);
});

test('temperature alone samples the full softmax', () => {
  const logits = new Float32Array([1, 0, -1, 2, 0.5]);
  const ids = [0, 1, 2, 3, 4];
  const draws = drawMany({ temperature: 0.8, topK: 0, topP: 1, repetitionPenalty: 1, seed: 12 }, logits, 20_000);
  assertDistribution(frequencies(draws), softmaxOver(logits, ids, 0.8), 0.015);
  // -Infinity (a masked token) is never drawn.
  const masked = new Float32Array([0, -Infinity, 0]);
  assert.ok(drawMany({ temperature: 1, topK: 0, topP: 1, repetitionPenalty: 1, seed: 1 }, masked, 500).every((d) => d !== 1));
});

test('same seed, same tokens; different seed, different tokens; the logits buffer is untouched', () => {
  const vocab = 2000;
  const logits = randomLogits(vocab, 3, 2);
  const before = Float32Array.from(logits);
  for (const shape of [
    { topK: 0, topP: 1 },
    { topK: 50, topP: 1 },
    { topK: 0, topP: 0.9 },
    { topK: 40, topP: 0.9 },
  ]) {
    const params = { temperature: 1, repetitionPenalty: 1.3, ...shape };
    const a = drawMany({ ...params, seed: 77 }, logits, 200);
    const b = drawMany({ ...params, seed: 77 }, logits, 200);
    const c = drawMany({ ...params, seed: 78 }, logits, 200);
    assert.deepEqual(a, b, JSON.stringify(shape));
    assert.notDeepEqual(a, c, JSON.stringify(shape));
  }
  assert.deepEqual(logits, before);
});

test('a seeded row draws the same tokens alone and interleaved with other rows of a batch', () => {
  const vocab = 3000;
  const batch = randomLogits(vocab * 4, 17, 2);
  const shapes: SamplerParams[] = [
    { temperature: 0.9, topK: 0, topP: 0.8, repetitionPenalty: 1.2, seed: 5 },
    { temperature: 1.1, topK: 20, topP: 1, repetitionPenalty: 1, seed: 6 },
    { temperature: 0.7, topK: 0, topP: 1, repetitionPenalty: 1.1, seed: 7 },
    { ...GREEDY, repetitionPenalty: 1.5 },
  ];
  const alone = shapes.map((params, row) => drawMany(params, batch, 50, row * vocab, vocab));
  const samplers = shapes.map((params) => new RowSampler(params, []));
  const together: number[][] = shapes.map(() => []);
  for (let step = 0; step < 50; step++) {
    samplers.forEach((s, row) => together[row].push(s.sample(batch, row * vocab, vocab)));
  }
  assert.deepEqual(together, alone);
});

test('repetition penalty changes the argmax in a constructed case, from prompt and from generated ids', () => {
  // Positive logits are divided, negative multiplied (HF/CTRL).
  const logits = new Float32Array([2.0, 1.5, -0.5, -0.4]);
  const out = new Float32Array(4);
  applyRepetitionPenalty(logits, 0, 4, [0, 3], 2, out);
  assert.deepEqual(Array.from(out), [1.0, 1.5, -0.5, Math.fround(-0.4) * 2].map(Math.fround));

  const penalised = { ...GREEDY, repetitionPenalty: 2 };
  assert.equal(new RowSampler(GREEDY, [0]).sample(logits, 0, 4), 0);
  assert.equal(new RowSampler(penalised, [0]).sample(logits, 0, 4), 1, 'prompt id 0 is penalised');

  // Generated ids count too: each pick is penalised for the next one.
  const row = new Float32Array([2.0, 1.9, 1.2]);
  const sampler = new RowSampler(penalised, []);
  assert.equal(sampler.sample(row, 0, 3), 0);
  assert.equal(sampler.sample(row, 0, 3), 1);
  assert.equal(sampler.sample(row, 0, 3), 2);

  // Negative logits: multiplying by the penalty makes a seen token less likely.
  const negative = new Float32Array([-1, -1.5]);
  assert.equal(new RowSampler(penalised, [0]).sample(negative, 0, 2), 1);
});

test('top-k and top-p select without sorting the vocabulary', () => {
  const vocab = 50257;
  const logits = randomLogits(vocab, 99, 2);
  const sortSpy = Array.prototype.sort;
  let largest = 0;
  Array.prototype.sort = function (this: unknown[], compare?: (a: unknown, b: unknown) => number) {
    largest = Math.max(largest, this.length);
    return sortSpy.call(this, compare) as unknown[];
  };
  try {
    drawMany({ temperature: 1, topK: 50, topP: 0.9, repetitionPenalty: 1, seed: 1 }, logits, 3);
    assert.ok(largest <= 50, `sorted ${largest} items with top-k 50`);
    largest = 0;
    logits[7] = 20;
    drawMany({ temperature: 1, topK: 0, topP: 0.9, repetitionPenalty: 1, seed: 1 }, logits, 3);
    assert.ok(largest < 100, `sorted ${largest} items with a peaked row and top-p`);
  } finally {
    Array.prototype.sort = sortSpy;
  }
});
