/**
 * The registry's index (listings, counts, pages without reading manifests)
 * and pinning (held in the cache, persisted in the manifest, bounded by the
 * cache budget), over real files in a real store.
 */
import assert from 'node:assert/strict';
import { readFile, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { Registry } from '../src/deltas/registry.js';
import { ServeError } from '../src/errors.js';
import { gpt2Like } from './helpers/backbone-info.js';
import { peftFactors, tempDir, writePeft } from './helpers/deltas.js';

const backbone = gpt2Like(2, 16);
/** Bytes of one rank-4 LoRA on c_attn (16 → 48), as the cache charges it. */
const LORA_BYTES = (16 * 4 + 4 * 48) * 4;

const open = (dir: string, cacheBytes = 1 << 20, syncMs?: number) => Registry.open({ dir, backbone, cacheBytes, syncMs });

async function lora(t: TestContext, seed: number) {
  const dir = await tempDir(t, `lora${seed}`);
  return writePeft(dir, { layers_to_transform: [0] }, peftFactors([['transformer.h.0.attn.c_attn', 16, 48]], 4, seed));
}

test('pages walk every id once, in order, with has_more; count needs no disk', async (t) => {
  const store = await tempDir(t, 'store');
  const registry = await open(store);
  const files = await lora(t, 1);
  const ids = ['b', 'a', 'd', 'c', 'e'];
  for (const id of ids) await registry.register(id, files, { replace: false });

  const seen: string[] = [];
  let after: string | undefined;
  for (;;) {
    const page = await registry.page({ limit: 2, after });
    seen.push(...page.records.map((r) => r.id));
    if (!page.hasMore) break;
    after = page.records.at(-1)!.id;
  }
  assert.deepEqual(seen, ['a', 'b', 'c', 'd', 'e']);
  assert.deepEqual((await registry.page({ limit: 10, after: 'bb' })).records.map((r) => r.id), ['c', 'd', 'e']);
  assert.equal((await registry.page({ limit: 3 })).hasMore, true);
  assert.equal((await registry.page({ limit: 5 })).hasMore, false);
  assert.deepEqual((await registry.page({ limit: 5, after: 'e' })).records, []);

  // The index answers from memory: with the store's files gone from under it, the count is still this process's view.
  assert.equal(registry.count(), 5);
  await registry.remove('c');
  assert.equal(registry.count(), 4);
  assert.deepEqual((await registry.list()).map((r) => r.id), ['a', 'b', 'd', 'e']);
});

test('the index picks up another replica\'s registrations and removals after syncMs', async (t) => {
  const store = await tempDir(t, 'store');
  const mine = await open(store, 1 << 20, 0);
  const theirs = await open(store);
  const files = await lora(t, 2);
  await theirs.register('from-them', files, { replace: false });
  assert.deepEqual((await mine.list()).map((r) => r.id), ['from-them']);
  await theirs.remove('from-them');
  assert.deepEqual((await mine.page({ limit: 10 })).records, []);
  // A replica with a long syncMs still sees a delta asked for by id, and remembers it.
  const slow = await open(store, 1 << 20, 60_000);
  await theirs.register('late', files, { replace: false });
  assert.equal((await slow.list()).length, 0);
  assert.equal((await slow.get('late'))?.id, 'late');
  assert.deepEqual((await slow.list()).map((r) => r.id), ['late']);
});

test('a sync of a store whose folder did not change reads no names: its mtime says so, and a change moves it', async (t) => {
  const store = await tempDir(t, 'store');
  const mine = await open(store, 1 << 20, 0);
  const theirs = await open(store);
  const files = await lora(t, 7);
  await theirs.register('a', files, { replace: false });
  // The folder's mtime set well in the past, so the next full read can trust it (not within the slack of a recent change).
  const past = Math.floor(Date.now() / 1000) - 10;
  await utimes(store, past, past);
  assert.deepEqual((await mine.list()).map((r) => r.id), ['a'], 'a changed mtime: the names are read');
  // Another replica adds 'b' and the mtime is put back: a sync that trusts the mtime cannot see it, which shows it read no names.
  await theirs.register('b', files, { replace: false });
  await utimes(store, past, past);
  assert.deepEqual((await mine.list()).map((r) => r.id), ['a']);
  assert.equal(mine.count(), 1);
  // Any real change moves the mtime: both are seen at the next sync.
  await theirs.register('c', files, { replace: false });
  assert.deepEqual((await mine.list()).map((r) => r.id), ['a', 'b', 'c']);
  await theirs.remove('a');
  assert.deepEqual((await mine.list()).map((r) => r.id), ['b', 'c']);
});

test('a pin is persisted in the manifest, survives a restart and a replace, and unpins', async (t) => {
  const store = await tempDir(t, 'store');
  const registry = await open(store);
  const files = await lora(t, 3);
  const before = await registry.register('p', files, { replace: false });
  assert.equal(before.pinned, false);
  const filesBefore = JSON.parse(await readFile(join(store, 'p', 'manifest.json'), 'utf8')).files;

  const pinned = await registry.setPinned('p', true);
  assert.equal(pinned.pinned, true);
  assert.equal(pinned.sha256, before.sha256, 'a pin changes none of the delta\'s content, so its version (the content hash) stays');
  const manifest = JSON.parse(await readFile(join(store, 'p', 'manifest.json'), 'utf8'));
  assert.equal(manifest.pinned, true);
  assert.deepEqual(manifest.files, filesBefore, 'the stored files are untouched');
  assert.equal(registry.isCached('p'), true, 'a pinned delta is loaded at once');
  assert.deepEqual(registry.cache.heldIds(), ['p']);
  // The version the cache holds is the one the store has now.
  assert.equal(registry.cache.version('p'), pinned.sha256);

  const reopened = await open(store);
  assert.equal((await reopened.get('p'))?.pinned, true);
  assert.equal(reopened.isCached('p'), true, 'startup loads pinned deltas');

  const replaced = await registry.register('p', await lora(t, 4), { replace: true });
  assert.equal(replaced.pinned, true, 'a replace keeps the pin');
  assert.equal(registry.cache.version('p'), replaced.sha256, 'and holds the new version');

  const unpinned = await registry.setPinned('p', false);
  assert.equal(unpinned.pinned, false);
  assert.deepEqual(registry.cache.heldIds(), []);
  const lease = await registry.acquire('p');
  assert.equal(lease.delta.version, unpinned.sha256, 'the next use runs the version the store holds now');
  lease.release();
  assert.equal(JSON.parse(await readFile(join(store, 'p', 'manifest.json'), 'utf8')).pinned, false);
});

test('pinned bytes past the cache budget are a 409 that says how to fix it; unknown ids 404', async (t) => {
  const store = await tempDir(t, 'store');
  const registry = await open(store, 2 * LORA_BYTES + 100);
  const files = await lora(t, 5);
  for (const id of ['a', 'b', 'c']) await registry.register(id, files, { replace: false });
  await registry.setPinned('a', true);
  await registry.setPinned('b', true);
  await assert.rejects(registry.setPinned('c', true), (err: ServeError) => {
    assert.equal(err.status, 409);
    assert.equal(err.code, 'pin_budget_exceeded');
    assert.match(err.message, new RegExp(`${3 * LORA_BYTES} pinned bytes.*budget of ${2 * LORA_BYTES + 100} bytes`));
    assert.match(err.message, /unpin another delta|DELTASERVE_CACHE_BYTES/);
    return true;
  });
  assert.equal((await registry.get('c'))?.pinned, false, 'a refused pin changes nothing');
  await registry.setPinned('a', true); // pinning again is not counted twice
  await registry.setPinned('a', false);
  assert.equal((await registry.setPinned('c', true)).pinned, true);
  await assert.rejects(registry.setPinned('nope', true), (err: ServeError) => err.status === 404 && err.code === 'delta_not_found');
});

test('a pinned delta stays a hit while other deltas churn through a cache too small for them all', async (t) => {
  const store = await tempDir(t, 'store');
  // Room for three deltas: the pinned one and two others.
  const registry = await open(store, 3 * LORA_BYTES);
  const files = await lora(t, 6);
  for (let i = 0; i < 10; i++) await registry.register(`d${i}`, files, { replace: false });
  await registry.setPinned('d0', true);
  for (let round = 0; round < 3; round++) {
    for (let i = 1; i < 10; i++) {
      const lease = await registry.acquire(`d${i}`);
      lease.release();
      assert.equal(registry.isCached('d0'), true, `d0 evicted by d${i}`);
      assert.ok(registry.cache.bytes <= 3 * LORA_BYTES, 'the cache keeps to its budget');
    }
  }
  // An unpinned one was evicted all along.
  assert.equal(registry.isCached('d1'), false);
});

test('a delta that only held bytes keep out is admitted anyway, not left waiting', async (t) => {
  const store = await tempDir(t, 'store');
  const registry = await open(store, 2 * LORA_BYTES);
  const files = await lora(t, 7);
  for (const id of ['a', 'b', 'c']) await registry.register(id, files, { replace: false });
  await registry.setPinned('a', true);
  await registry.setPinned('b', true);
  const lease = await registry.acquire('c');
  assert.equal(lease.delta.id, 'c');
  lease.release();
  assert.equal(registry.isCached('a') && registry.isCached('b'), true);
});

test('a removed pinned delta frees its pin', async (t) => {
  const store = await tempDir(t, 'store');
  const registry = await open(store, LORA_BYTES + 10);
  const files = await lora(t, 8);
  await registry.register('a', files, { replace: false });
  await registry.register('b', files, { replace: false });
  await registry.setPinned('a', true);
  await registry.remove('a');
  assert.deepEqual(registry.cache.heldIds(), []);
  assert.equal((await registry.setPinned('b', true)).pinned, true, 'the budget counts only pins that still exist');
});
