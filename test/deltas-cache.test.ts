import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { DeltaCache } from '../src/deltas/cache.js';
import type { LoadedDelta } from '../src/deltas/types.js';

/** A real BitFit delta whose parameter data is `bytes` long. */
function delta(id: string, bytes: number, version = 'v1'): LoadedDelta {
  const bias = new Float32Array(bytes / 4);
  return { id, version, type: 'bitfit', format: 'opendelta', rank: 0, sites: [{ module: 'm', site: 'bias', axes: {}, data: { bias } }], bytes };
}

function setup(maxBytes: number, sizes: Record<string, number> = {}, delayMs = 0) {
  const events: string[] = [];
  const loads: string[] = [];
  let bytes = 0;
  let version = 0;
  const cache = new DeltaCache({
    maxBytes,
    load: async (id) => {
      loads.push(id);
      if (delayMs) await sleep(delayMs);
      if (id.startsWith('missing')) throw new Error(`no ${id}`);
      return delta(id, sizes[id] ?? 100, `v${++version}`);
    },
    hooks: {
      onHit: (id) => events.push(`hit:${id}`),
      onMiss: (id) => events.push(`miss:${id}`),
      onEvict: (id) => events.push(`evict:${id}`),
      onBytes: (b) => (bytes = b),
      onLoadSeconds: (s) => assert.ok(s >= 0),
    },
  });
  return { cache, events, loads, bytes: () => bytes };
}

async function touch(cache: DeltaCache, ...ids: string[]) {
  for (const id of ids) (await cache.acquire(id)).release();
}

test('least recently released is evicted first, within the byte budget', async () => {
  const { cache, events, bytes } = setup(300);
  await touch(cache, 'a', 'b', 'c');
  assert.equal(bytes(), 300);
  assert.deepEqual(cache.evictionOrder(), ['a', 'b', 'c']);
  await touch(cache, 'd');
  assert.deepEqual(events.filter((e) => e.startsWith('evict')), ['evict:a']);
  assert.deepEqual(cache.evictionOrder(), ['b', 'c', 'd']);
  await touch(cache, 'b'); // a hit refreshes b
  await touch(cache, 'e');
  assert.deepEqual(events.filter((e) => e.startsWith('evict')), ['evict:a', 'evict:c']);
  assert.deepEqual(cache.evictionOrder(), ['d', 'b', 'e']);
  assert.equal(bytes(), 300);
  assert.equal(cache.bytes, 300);
  assert.equal(events.filter((e) => e === 'hit:b').length, 1);
  assert.equal(events.filter((e) => e.startsWith('miss')).length, 5);
});

test('a pinned delta is never evicted, though it is the oldest', async () => {
  const { cache, events } = setup(300);
  const a = await cache.acquire('a');
  await touch(cache, 'b', 'c');
  await touch(cache, 'd');
  assert.deepEqual(events.filter((e) => e.startsWith('evict')), ['evict:b']);
  assert.ok(cache.has('a'));
  assert.deepEqual(cache.evictionOrder(), ['c', 'd']);
  a.release();
  assert.deepEqual(cache.evictionOrder(), ['c', 'd', 'a']);
  assert.equal(cache.bytes, 300);
});

test('when every byte is pinned, acquire waits for a release instead of failing', async () => {
  const { cache, events } = setup(200);
  const a = await cache.acquire('a');
  const b = await cache.acquire('b');
  let got: string | null = null;
  const pending = cache.acquire('c').then((l) => {
    got = l.delta.id;
    return l;
  });
  await sleep(30);
  assert.equal(got, null, 'c must wait while a and b are pinned');
  assert.equal(cache.bytes, 200);
  b.release();
  const c = await pending;
  assert.equal(got, 'c');
  assert.deepEqual(events.filter((e) => e.startsWith('evict')), ['evict:b']);
  assert.ok(cache.has('a') && cache.has('c') && !cache.has('b'));
  assert.equal(cache.bytes, 200);
  a.release();
  c.release();
});

test('concurrent misses for one id load it once; it stays pinned until the last lease is released', async () => {
  const { cache, loads, events } = setup(1000, {}, 20);
  const leases = await Promise.all([1, 2, 3, 4, 5].map(() => cache.acquire('x')));
  assert.deepEqual(loads, ['x']);
  assert.ok(leases.every((l) => l.delta === leases[0].delta));
  assert.equal(events.filter((e) => e === 'miss:x').length, 5);
  for (const l of leases.slice(0, 4)) l.release();
  leases[0].release(); // a second release of one lease changes nothing
  assert.deepEqual(cache.evictionOrder(), [], 'still pinned by one lease');
  leases[4].release();
  assert.deepEqual(cache.evictionOrder(), ['x']);
  await touch(cache, 'x');
  assert.deepEqual(loads, ['x']);
  assert.ok(events.includes('hit:x'));
});

test('a failed load rejects every waiter, pins nothing, and the next acquire tries again', async () => {
  const { cache, loads } = setup(1000, {}, 10);
  const results = await Promise.allSettled([cache.acquire('missing'), cache.acquire('missing')]);
  assert.ok(results.every((r) => r.status === 'rejected'));
  assert.equal(cache.bytes, 0);
  await assert.rejects(cache.acquire('missing'));
  assert.deepEqual(loads, ['missing', 'missing']);
});

test('invalidate: holders keep the old version, new acquires load the new one, even mid-load', async () => {
  const { cache, loads } = setup(1000, {}, 20);
  const old = await cache.acquire('t');
  cache.invalidate('t');
  assert.equal(cache.has('t'), false);
  const slow = cache.acquire('t'); // loading v2
  await sleep(5);
  cache.invalidate('t'); // replaced again while v2 loads
  const newest = await cache.acquire('t');
  const mid = await slow;
  assert.deepEqual(loads, ['t', 't', 't']);
  assert.equal(old.delta.version, 'v1');
  assert.equal(mid.delta.version, 'v2');
  assert.equal(newest.delta.version, 'v3');
  assert.equal(cache.bytes, 300);
  old.release();
  mid.release();
  newest.release();
  // Stale versions are dropped on release; only the current one stays cached.
  assert.deepEqual(cache.evictionOrder(), ['t']);
  assert.equal(cache.bytes, 100);
});

test('a delta larger than the whole budget runs once nothing else is pinned', async () => {
  const { cache, events } = setup(150, { big: 400 });
  const a = await cache.acquire('a');
  let done = false;
  const pending = cache.acquire('big').then((l) => ((done = true), l));
  await sleep(20);
  assert.equal(done, false);
  a.release();
  const big = await pending;
  assert.equal(cache.bytes, 400);
  big.release();
  assert.ok(events.includes('evict:big'), 'too big to keep once released');
  assert.equal(cache.bytes, 0);
});
