/**
 * Issue 13's numbered problems, one test (or a few) each, at the layer where
 * the root cause lives: the store, the formats' regexes, the upload parser,
 * the import route, the HTTP error mapping and request metrics. The problems
 * that need the real engine (1: huge prompts, 6: overflowing deltas) are in
 * e2e-reliability.test.ts.
 */
import assert from 'node:assert/strict';
import { mkdir, readdir, rm, truncate, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import request from 'supertest';
import { Registry } from '../src/deltas/registry.js';
import { DeltaStore } from '../src/deltas/store.js';
import { createLogger } from '../src/log.js';
import { gpt2Like } from './helpers/backbone-info.js';
import { PEFT_BASE_CONFIG, peftFactors, tempDir, writePeft } from './helpers/deltas.js';
import { listen, testApp } from './helpers/http-app.js';

const backbone = gpt2Like(2, 16);
const lora = (seed: number) => peftFactors([['transformer.h.0.attn.c_attn', 16, 48], ['transformer.h.1.attn.c_attn', 16, 48]], 4, seed);

// --- 2: user regexes run in linear time -----------------------------------------

test('2: a catastrophic-backtracking target_modules regex is answered at once, not run for ever', async (t) => {
  const store = await tempDir(t, 'store');
  const src = await tempDir(t, 'src');
  const registry = await Registry.open({ dir: store, backbone, cacheBytes: 1 << 20 });
  for (const [i, bomb] of ['(.*.*)*X', '(a|a)*$|(.*)*c_attnX', '(?:(?:.*)*)*\\.c_attn.Y'].entries()) {
    const files = await writePeft(join(src, String(i)), { ...PEFT_BASE_CONFIG, target_modules: bomb }, lora(i));
    const started = performance.now();
    await assert.rejects(registry.register(`bomb${i}`, files, { replace: false }), /matches no linear module/);
    assert.ok(performance.now() - started < 2000, `${bomb} took ${performance.now() - started} ms`);
  }
  // A regex an RE2 engine cannot run (a backreference) is refused with the reason, not run by a backtracking engine.
  const files = await writePeft(join(src, 'backref'), { ...PEFT_BASE_CONFIG, target_modules: '(c_attn)\\1' }, lora(9));
  await assert.rejects(registry.register('backref', files, { replace: false }), /target_modules: .*not a valid regular expression.*RE2/s);
  // A well-meant regex still selects what PEFT would.
  const ok = await writePeft(join(src, 'ok'), { ...PEFT_BASE_CONFIG, target_modules: '.*\\.h\\.\\d+\\.attn\\.c_attn' }, lora(3));
  assert.equal((await registry.register('ok', ok, { replace: false })).sites.length, 2);
});

// --- 3: uploads never leak, whatever the client does -------------------------------

test('3: a client that declares 100 MB of multipart and disconnects after 3 MB leaves no temp folder, and the handler settles', async (t) => {
  const uploads = await tempDir(t, 'uploads');
  const { app } = testApp({ env: { DELTASERVE_UPLOAD_TMP_DIR: uploads } });
  const server = await listen(app);
  t.after(() => server.close());
  const { port } = server.server.address() as { port: number };
  const socket = connect(port, '127.0.0.1');
  await new Promise((r) => socket.once('connect', r));
  const head = '--B\r\nContent-Disposition: form-data; name="id"\r\n\r\nx\r\n--B\r\nContent-Disposition: form-data; name="f"; filename="adapter_model.safetensors"\r\n\r\n';
  socket.write(`POST /v1/deltas HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\nContent-Length: ${100e6}\r\n\r\n${head}`);
  for (let i = 0; i < 3; i++) socket.write(Buffer.alloc(1 << 20, 1));
  const until = Date.now() + 5000;
  while ((await readdir(uploads)).length === 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 10));
  assert.equal((await readdir(uploads)).length, 1, 'the upload is being written to its temp folder');
  socket.destroy();
  while ((await readdir(uploads)).length > 0 && Date.now() < until + 5000) await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(await readdir(uploads), [], 'the temp folder is removed once the client is gone');
  // The server still answers (no handler stuck holding it).
  await request(app).get('/healthz').expect(200);
});

test('3: startup removes upload temp folders and store .tmp- folders left by a killed process', async (t) => {
  const root = await tempDir(t, 'startup');
  const uploads = join(root, 'uploads');
  const deltas = join(root, 'deltas');
  // A pid that cannot be alive (above Linux's pid_max), as a SIGKILLed writer leaves them.
  const dead = 2 ** 22 + 17;
  const host = hostname().replace(/[^A-Za-z0-9_.]/g, '_');
  await mkdir(join(uploads, `deltaserve-upload-${dead}@${host}-abc`), { recursive: true });
  await writeFile(join(uploads, `deltaserve-upload-${dead}@${host}-abc`, 'adapter_model.safetensors'), 'partial');
  await mkdir(join(deltas, `.tmp-${dead}@${host}-0123456789abcdef`), { recursive: true });
  await writeFile(join(deltas, `.tmp-${dead}@${host}-0123456789abcdef`, 'adapter_model.safetensors'), 'partial');
  // A live writer's folders (this process) are left alone.
  await mkdir(join(uploads, `deltaserve-upload-${process.pid}@${host}-live`), { recursive: true });
  await mkdir(join(deltas, `.tmp-${process.pid}@${host}-fedcba9876543210`), { recursive: true });

  const { sweepUploadTemps } = await import('../src/http/upload.js');
  await sweepUploadTemps(uploads);
  await DeltaStore.open(deltas);
  assert.deepEqual(await readdir(uploads), [`deltaserve-upload-${process.pid}@${host}-live`]);
  assert.deepEqual(await readdir(deltas), [`.tmp-${process.pid}@${host}-fedcba9876543210`]);
});

test('3: a store write names its temp folder by the writing process, so a restart knows whose it is', async (t) => {
  const deltas = await tempDir(t, 'store');
  const seen: string[] = [];
  const store = await DeltaStore.open(deltas, { onStep: async () => { seen.push(...(await readdir(deltas)).filter((e) => e.startsWith('.tmp-'))); } });
  await store.write('a', new Map([['config.json', new Uint8Array([1])]]), {
    type: 'lora', format: 'peft', rank: 1, fingerprint: 'f', bytes: 1, sites: [],
  }, { replace: false });
  assert.ok(seen.length > 0 && seen.every((e) => e.startsWith(`.tmp-${process.pid}@`)), seen.join(','));
});

// --- 4: one size limit for every way a delta comes in --------------------------

test('4: an import by path larger than DELTASERVE_MAX_UPLOAD_BYTES is refused with 413 before it is read', async (t) => {
  const importDir = await tempDir(t, 'import');
  const { app, registry } = testApp({ env: { DELTASERVE_IMPORT_DIR: importDir, DELTASERVE_MAX_UPLOAD_BYTES: '1MiB' } });
  await mkdir(join(importDir, 'big'));
  await writeFile(join(importDir, 'big', 'adapter_config.json'), '{}');
  // Sparse: 3 GB on paper, nothing on disk.
  await writeFile(join(importDir, 'big', 'adapter_model.safetensors'), '');
  await truncate(join(importDir, 'big', 'adapter_model.safetensors'), 3e9);
  for (const res of [
    await request(app).post('/v1/deltas').send({ id: 'big', path: 'big' }),
    await request(app).post('/v1/load_lora_adapter').send({ lora_name: 'big', lora_path: 'big' }),
  ]) {
    assert.equal(res.status, 413, JSON.stringify(res.body));
    assert.match(JSON.stringify(res.body), /3000000002 bytes.*limit of 1048576 bytes \(DELTASERVE_MAX_UPLOAD_BYTES\)/);
  }
  assert.equal(registry.registerCalls, 0);
});

// --- 5: foreign entries in the store ----------------------------------------------

test('5: stray files and folders in the store are ignored and logged, not a 500', async (t) => {
  const store = await tempDir(t, 'store');
  const src = await tempDir(t, 'src');
  const lines: string[] = [];
  const logger = createLogger('warn', { write: (s: string) => lines.push(s) });
  const registry = await Registry.open({ dir: store, backbone, cacheBytes: 1 << 20, logger });
  await registry.register('real', await writePeft(src, { ...PEFT_BASE_CONFIG }, lora(1)), { replace: false });
  await writeFile(join(store, 'README.md'), '# notes');
  await mkdir(join(store, 'empty-folder'));
  await mkdir(join(store, 'bad-manifest'));
  await writeFile(join(store, 'bad-manifest', 'manifest.json'), '{not json');
  assert.deepEqual((await registry.list()).map((r) => r.id), ['real']);
  assert.equal(await registry.get('README.md'), null);
  assert.equal(await registry.get('bad-manifest'), null);
  const logged = lines.join('');
  for (const name of ['README.md', 'empty-folder', 'bad-manifest']) assert.match(logged, new RegExp(`${name.replace('.', '\\.')}.*not a delta`));
});

// --- 7: errors a client causes are 4xx, and every response is counted ----------------

test('7: Content-Encoding: gzip on a plain body is a 400 saying so', async () => {
  const { app } = testApp();
  const res = await request(app).post('/v1/generate').set('content-type', 'application/json').set('content-encoding', 'gzip').send('{"inputs":"a"}');
  assert.equal(res.status, 400);
  assert.match(res.body.error.message, /Content-Encoding: gzip.*could not be decompressed/);
});

test('7: 400 and 413 answers on every generation route are in deltaserve_request_duration_seconds', async () => {
  const { app } = testApp({ env: { DELTASERVE_MAX_BODY_BYTES: '1KiB' } });
  const routes = ['/v1/generate', '/v1/completions', '/v1/chat/completions', '/generate', '/generate_stream', '/'];
  for (const path of routes) {
    await request(app).post(path).send({ nonsense: true }).expect(400);
    await request(app).post(path).send({ inputs: 'x'.repeat(4096) }).expect(413);
  }
  const text = (await request(app).get('/metrics')).text;
  const count = (status: number) => Number(/deltaserve_request_duration_seconds_count\{task="other",status="(\d+)"\} (\d+)/g.exec(
    text.split('\n').find((l) => l.startsWith('deltaserve_request_duration_seconds_count') && l.includes(`status="${status}"`)) ?? '',
  )?.[2] ?? 0);
  assert.equal(count(400), routes.length);
  assert.equal(count(413), routes.length);
});

// --- 8: clear messages for the smaller problems ---------------------------------------

test('8: JSON that is not an object says what it is', async () => {
  const { app } = testApp();
  for (const [body, what] of [['null', 'null'], ['"hi"', 'a string'], ['[1]', 'an array'], ['5', 'a number']]) {
    const res = await request(app).post('/v1/generate').set('content-type', 'application/json').send(body);
    assert.equal(res.status, 400);
    assert.equal(res.body.error.message, `the request body must be a JSON object, got ${what}`);
  }
  const broken = await request(app).post('/v1/generate').set('content-type', 'application/json').send('{"inputs":');
  assert.match(broken.body.error.message, /not valid JSON/);
});

test('8: prompt lists say one prompt per request; tool_choice "required" is refused; duplicate JSON keys are refused', async () => {
  const { app } = testApp();
  const list = await request(app).post('/v1/completions').send({ model: 'test-backbone', prompt: ['a', 'b'] });
  assert.equal(list.status, 400);
  assert.match(list.body.error.message, /^prompt: deltaserve takes one prompt per request/);
  const num = await request(app).post('/v1/completions').send({ model: 'test-backbone', prompt: 5 });
  assert.match(num.body.error.message, /^prompt: expected a string or a list of one string/);

  const required = await request(app).post('/v1/chat/completions').send({ model: 'test-backbone', messages: [{ role: 'user', content: 'hi' }], tool_choice: 'required' });
  assert.equal(required.status, 400);
  assert.match(required.body.error.message, /tool_choice.*deltaserve does not call tools/);
  await request(app).post('/v1/chat/completions').send({ model: 'test-backbone', messages: [{ role: 'user', content: 'hi' }], tool_choice: 'none' }).expect(200);

  const dup = await request(app).post('/v1/deltas').set('content-type', 'application/json').send('{"id":"a","path":"p","id":"b"}');
  assert.equal(dup.status, 400);
  assert.match(dup.body.error.message, /"id" appears twice/);
  const dupMultipart = await request(app).post('/v1/deltas').field('id', 'a').field('id', 'b').attach('f', Buffer.from('{}'), 'config.json');
  assert.equal(dupMultipart.status, 400);
  assert.match(dupMultipart.body.error.message, /form field "id" appears twice/);
});

test('8: the returned sha256 is the delta content\'s: identical uploads get identical hashes', async (t) => {
  const src = await tempDir(t, 'src');
  const files = await writePeft(src, { ...PEFT_BASE_CONFIG }, lora(5));
  const a = await Registry.open({ dir: await tempDir(t, 'a'), backbone, cacheBytes: 1 << 20 });
  const first = await a.register('x', files, { replace: false });
  await new Promise((r) => setTimeout(r, 5));
  const second = await a.register('x', files, { replace: true });
  const other = await (await Registry.open({ dir: await tempDir(t, 'b'), backbone, cacheBytes: 1 << 20 })).register('y', files, { replace: false });
  assert.notEqual(first.createdAt, second.createdAt);
  assert.equal(first.sha256, second.sha256);
  assert.equal(first.sha256, other.sha256);
  const changed = await writePeft(join(src, 'changed'), { ...PEFT_BASE_CONFIG }, lora(6));
  assert.notEqual((await a.register('x', changed, { replace: true })).sha256, first.sha256);
  await rm(join(src, 'changed'), { recursive: true });
});

test('8: deltas registered for another backbone are named in a startup warning', async (t) => {
  const store = await tempDir(t, 'store');
  const src = await tempDir(t, 'src');
  const other = gpt2Like(2, 16, 'other-backbone');
  await (await Registry.open({ dir: store, backbone: other, cacheBytes: 1 << 20 })).register('made-elsewhere', await writePeft(src, { ...PEFT_BASE_CONFIG }, lora(1)), { replace: false });
  const lines: string[] = [];
  await Registry.open({ dir: store, backbone: { ...backbone, fingerprint: 'this-backbone' }, cacheBytes: 1 << 20, logger: createLogger('warn', { write: (s: string) => lines.push(s) }) });
  assert.match(lines.join(''), /1 delta in the store was registered for another backbone.*made-elsewhere/);
});
