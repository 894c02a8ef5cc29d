import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { ServeError } from '../src/errors.js';
import { Registry } from '../src/deltas/registry.js';
import { contentSha256, type WriteStep } from '../src/deltas/store.js';
import { gpt2Like } from './helpers/backbone-info.js';
import { peftFactors, tempDir, treeHash, writeDelta, writePeft } from './helpers/deltas.js';

const backbone = gpt2Like(2, 16);
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

const open = (dir: string, staleTempMs?: number) => Registry.open({ dir, backbone, cacheBytes: 1 << 20, store: { staleTempMs } });

async function makeLora(t: TestContext, seed: number) {
  const dir = await tempDir(t, `lora${seed}`);
  const files = await writePeft(dir, { layers_to_transform: [0] }, peftFactors([['transformer.h.0.attn.c_attn', 16, 48]], 4, seed));
  return { dir, files };
}

async function hashesOf(dir: string, names: string[]) {
  return Object.fromEntries(await Promise.all(names.map(async (n) => [n, sha(await readFile(join(dir, n)))])));
}

test('a registered delta is stored as uploaded, with a manifest, and listed', async (t) => {
  const store = await tempDir(t, 'store');
  const registry = await open(store);
  const { dir, files } = await makeLora(t, 1);
  await writeFile(join(dir, 'tokenizer.json'), '{}');
  const rec = await registry.register('task-1', [...files, { name: 'some/folder/tokenizer.json', path: join(dir, 'tokenizer.json') }], { replace: false });

  assert.deepEqual((await readdir(join(store, 'task-1'))).sort(), ['adapter_config.json', 'adapter_model.safetensors', 'manifest.json']);
  const manifestBytes = await readFile(join(store, 'task-1', 'manifest.json'));
  const manifest = JSON.parse(manifestBytes.toString());
  // The version hashes the delta's content (its files' names and hashes), not when it was written.
  assert.equal(rec.sha256, contentSha256(manifest.files));
  assert.notEqual(rec.sha256, sha(manifestBytes));
  assert.deepEqual(manifest.files, await hashesOf(dir, ['adapter_config.json', 'adapter_model.safetensors']));
  assert.equal(manifest.fingerprint, backbone.fingerprint);
  assert.equal(manifest.type, 'lora');
  assert.equal(manifest.format, 'peft');
  assert.equal(manifest.rank, 4);
  assert.equal(manifest.bytes, (16 * 4 + 4 * 48) * 4);
  assert.ok(!Number.isNaN(Date.parse(manifest.created_at)));
  assert.deepEqual(manifest.sites, [{ module: 'transformer.h.0.attn.c_attn', kind: 'lora', site: 'lora', shapes: [[16, 4], [4, 48]] }]);
  for (const f of ['adapter_config.json', 'adapter_model.safetensors']) {
    assert.deepEqual(await readFile(join(store, 'task-1', f)), await readFile(join(dir, f)));
  }
  assert.deepEqual((await registry.list()).map((r) => r.id), ['task-1']);
  assert.deepEqual(await registry.get('task-1'), rec);
});

test('ids are checked, duplicates are 409, refusals and unknown ids leave the store unchanged', async (t) => {
  const store = await tempDir(t, 'store');
  const registry = await open(store);
  const { files } = await makeLora(t, 1);
  await registry.register('a', files, { replace: false });
  const before = await treeHash(store);
  for (const bad of ['', '.hidden', '-x', 'a/b', '..', 'x'.repeat(129), 'gpt2-test']) {
    await assert.rejects(registry.register(bad, files, { replace: false }), (e: ServeError) => e.status === 400);
  }
  await assert.rejects(registry.register('a', files, { replace: false }), (e: ServeError) => e.status === 409 && e.code === 'delta_exists');
  await assert.rejects(registry.remove('nope'), (e: ServeError) => e.status === 404 && e.code === 'delta_not_found');
  await assert.rejects(registry.acquire('nope'), (e: ServeError) => e.status === 404);
  assert.equal(await registry.get('nope'), null);
  assert.equal(await treeHash(store), before);
});

test('replace: holders of the old version keep it, new acquires get the new one; remove hides it', async (t) => {
  const store = await tempDir(t, 'store');
  const registry = await open(store);
  const v1 = await registry.register('task', (await makeLora(t, 1)).files, { replace: false });
  const old = await registry.acquire('task');
  assert.equal(old.delta.version, v1.sha256);
  const oldA = old.delta.sites[0].data.lora_a.slice();

  const { dir: dir2, files: files2 } = await makeLora(t, 100);
  const v2 = await registry.register('task', files2, { replace: true });
  assert.notEqual(v2.sha256, v1.sha256);
  const fresh = await registry.acquire('task');
  assert.equal(fresh.delta.version, v2.sha256);
  assert.notDeepEqual(fresh.delta.sites[0].data.lora_a, oldA);
  assert.deepEqual(old.delta.sites[0].data.lora_a, oldA);
  assert.deepEqual(JSON.parse((await readFile(join(store, 'task', 'manifest.json'))).toString()).files, await hashesOf(dir2, ['adapter_config.json', 'adapter_model.safetensors']));
  old.release();
  fresh.release();

  await registry.remove('task');
  assert.equal(await registry.get('task'), null);
  assert.equal(registry.isCached('task'), false);
  await assert.rejects(registry.acquire('task'), (e: ServeError) => e.code === 'delta_not_found');
  assert.deepEqual(await readdir(store), []);
});

test('replicas sharing a store see each other\'s registrations', async (t) => {
  const store = await tempDir(t, 'store');
  const a = await open(store);
  const b = await open(store);
  const rec = await a.register('shared', (await makeLora(t, 3)).files, { replace: false });
  assert.deepEqual(await b.get('shared'), rec);
  const lease = await b.acquire('shared');
  assert.equal(lease.delta.version, rec.sha256);
  lease.release();
  await assert.rejects(b.register('shared', (await makeLora(t, 4)).files, { replace: false }), (e: ServeError) => e.status === 409);
});

test('a replica serving a cached delta picks up a replace or remove made by another replica', async (t) => {
  const store = await tempDir(t, 'store');
  const a = await open(store);
  const b = await open(store);
  const v1 = await a.register('shared', (await makeLora(t, 5)).files, { replace: false });
  const held = await b.acquire('shared');
  held.release();
  assert.ok(b.isCached('shared'), 'b holds v1 in its cache');

  const v2 = await a.register('shared', (await makeLora(t, 6)).files, { replace: true });
  // Without a look at the store, b's cache would keep answering v1.
  const cachedBefore = await b.acquire('shared');
  assert.equal(cachedBefore.delta.version, v1.sha256, 'the cache alone still holds v1');
  assert.deepEqual(await b.current('shared'), v2);
  const after = await b.acquire('shared');
  assert.equal(after.delta.version, v2.sha256, 'after current(), b serves v2');
  assert.equal(cachedBefore.delta.version, v1.sha256, 'a holder of v1 keeps it');
  cachedBefore.release();
  after.release();

  await a.remove('shared');
  assert.equal(await b.current('shared'), null);
  assert.equal(b.isCached('shared'), false, 'b dropped the removed delta');
});

test('startup removes stale temp folders and restores a replace cut between its renames', async (t) => {
  const store = await tempDir(t, 'store');
  const registry = await open(store);
  await registry.register('x', (await makeLora(t, 1)).files, { replace: false });
  const before = await treeHash(store);
  const { rename } = await import('node:fs/promises');
  await rename(join(store, 'x'), join(store, '.old-x.0123abcd'));
  await mkdir(join(store, '.tmp-deadbeef'));
  await writeFile(join(store, '.tmp-deadbeef', 'adapter_config.json'), '{');
  await mkdir(join(store, '.trash-cafe'));
  const reopened = await open(store, 0);
  assert.equal(await treeHash(store), before);
  assert.deepEqual((await reopened.list()).map((r) => r.id), ['x']);
});

test('a young temp folder may be a replica still writing: startup leaves it', async (t) => {
  const store = await tempDir(t, 'store');
  await mkdir(join(store, '.tmp-young'), { recursive: true });
  await open(store);
  assert.deepEqual(await readdir(store), ['.tmp-young']);
});

/** Runs a registration in a child process, SIGKILLs it at `step` (or lets it finish), and returns its output. */
function runChild(store: string, deltaDir: string, id: string, replace: boolean, step: WriteStep | 'none'): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'test/helpers/crash-register.ts', store, deltaDir, id, replace ? '1' : '0', step], {
      cwd: ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => {
      out += d;
      if (out.includes('PAUSED')) child.kill('SIGKILL');
    });
    child.stderr.on('data', (d) => (err += d));
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      if (step === 'none' ? code === 0 : signal === 'SIGKILL') resolve(out);
      else reject(new Error(`child exited ${code} ${signal}: ${out} ${err}`));
    });
  });
}

const crashCases: { replace: boolean; step: WriteStep | 'none'; leftover: RegExp | null; after: 'old' | 'new' }[] = [
  { replace: false, step: 'temp-partial', leftover: /^\.tmp-/, after: 'old' },
  { replace: false, step: 'temp-written', leftover: /^\.tmp-/, after: 'old' },
  { replace: false, step: 'new-in', leftover: null, after: 'new' },
  { replace: false, step: 'none', leftover: null, after: 'new' },
  { replace: true, step: 'temp-partial', leftover: /^\.tmp-/, after: 'old' },
  { replace: true, step: 'temp-written', leftover: /^\.tmp-/, after: 'old' },
  { replace: true, step: 'old-aside', leftover: /^\.old-task\./, after: 'old' },
  { replace: true, step: 'new-in', leftover: /^\.old-task\./, after: 'new' },
  { replace: true, step: 'none', leftover: null, after: 'new' },
];

for (const c of crashCases) {
  test(`SIGKILL during ${c.replace ? 'replace' : 'register'} at ${c.step}: the store reopens in the ${c.after} state`, async (t) => {
    const store = await tempDir(t, 'store');
    const names = ['adapter_config.json', 'adapter_model.safetensors'];
    let oldHashes: Record<string, string> | null = null;
    if (c.replace) {
      const v1 = await makeLora(t, 1);
      await (await open(store)).register('task', v1.files, { replace: false });
      oldHashes = await hashesOf(v1.dir, names);
    }
    const v2 = await makeLora(t, 2);
    const out = await runChild(store, v2.dir, 'task', c.replace, c.step);
    assert.equal(out.includes('DONE'), c.step === 'none');
    const left = await readdir(store);
    if (c.leftover) assert.ok(left.some((e) => c.leftover!.test(e)), `expected a leftover matching ${c.leftover} in ${left}`);

    const registry = await open(store, 0);
    const entries = await readdir(store);
    assert.deepEqual(entries.filter((e) => e.startsWith('.')), [], 'no temp leftovers after reopening');
    const want = c.after === 'new' ? await hashesOf(v2.dir, names) : oldHashes;
    if (want === null) {
      assert.deepEqual(entries, []);
      assert.deepEqual(await registry.list(), []);
      return;
    }
    assert.deepEqual(entries, ['task']);
    assert.deepEqual((await readdir(join(store, 'task'))).sort(), [...names, 'manifest.json']);
    assert.deepEqual(await hashesOf(join(store, 'task'), names), want);
    const manifest = JSON.parse((await readFile(join(store, 'task', 'manifest.json'))).toString());
    assert.deepEqual(manifest.files, want);
    assert.deepEqual((await registry.list()).map((r) => r.id), ['task']);
    const delta = await registry.load('task');
    assert.equal(delta.sites.length, 1);
  });
}

test('a refused delta with a bad file name layout changes nothing either', async (t) => {
  const store = await tempDir(t, 'store');
  const registry = await open(store);
  const before = await treeHash(store);
  const files = await writeDelta(await tempDir(t, 'none'), { 'README.md': '# hi' });
  await assert.rejects(registry.register('x', files, { replace: false }), /cannot tell the delta's format from its files \(README\.md\)/);
  assert.equal(await treeHash(store), before);
});
