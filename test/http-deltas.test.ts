import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, rm, symlink, writeFile } from 'node:fs/promises';
import { request as httpRequest } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import request from 'supertest';
import { listen, testApp } from './helpers/http-app.js';

const CONFIG = Buffer.from('{"peft_type":"LORA","r":8}');
const WEIGHTS = Buffer.alloc(300, 7);

/** A temp folder for one test server's uploads: other processes' uploads in the OS's temp folder must not count. */
async function ownUploads(t: TestContext) {
  const dir = await mkdtemp(join(tmpdir(), 'deltaserve-test-uploads-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return { env: { DELTASERVE_UPLOAD_TMP_DIR: dir }, count: async () => (await readdir(dir)).filter((n) => n.startsWith('deltaserve-upload-')).length };
}

test('multipart upload: files arrive under their own filenames, whatever the field names', async (t) => {
  const uploads = await ownUploads(t);
  const uploadTemps = uploads.count;
  const { app, registry } = testApp({ env: uploads.env });
  const before = await uploadTemps();
  const res = await request(app)
    .post('/v1/deltas')
    .field('id', 'sql')
    .attach('file', CONFIG, 'adapter_config.json')
    .attach('whatever', WEIGHTS, 'adapter_model.safetensors');
  assert.equal(res.status, 201, JSON.stringify(res.body));
  assert.deepEqual(Object.keys(res.body).sort(), ['bytes', 'format', 'id', 'rank', 'sha256', 'sites', 'type']);
  assert.equal(res.body.id, 'sql');
  assert.equal(res.body.sites, 1);
  assert.equal(res.body.bytes, CONFIG.length + WEIGHTS.length);
  const got = registry.received.get('sql')!;
  assert.deepEqual(got.map((f) => f.name), ['adapter_config.json', 'adapter_model.safetensors']);
  assert.ok(got[0].content.equals(CONFIG));
  assert.ok(got[1].content.equals(WEIGHTS));
  assert.equal(await uploadTemps(), before, 'the temporary upload folder is removed');
});

test('the id field may come after the files', async () => {
  const { app, registry } = testApp();
  await request(app).post('/v1/deltas').attach('f', CONFIG, 'config.json').field('id', 'late').expect(201);
  assert.ok(registry.records.has('late'));
});

/** A hand-written multipart body: form-data clients strip directories from filenames, we must see them raw. */
const rawMultipart = (boundary: string, parts: { name: string; filename?: string; content: string }[]) =>
  parts
    .map((p) => `--${boundary}\r\nContent-Disposition: form-data; name="${p.name}"${p.filename === undefined ? '' : `; filename="${p.filename}"`}\r\n\r\n${p.content}\r\n`)
    .join('') + `--${boundary}--\r\n`;

test('filenames with path separators or ".." are refused and nothing is registered', async () => {
  for (const name of ['../evil.json', 'a/b.json', 'a\\b.json', '..', '']) {
    const { app, registry } = testApp();
    const body = rawMultipart('B0undary', [{ name: 'id', content: 'x' }, { name: 'f', filename: name, content: '{}' }]);
    const res = await request(app).post('/v1/deltas').set('content-type', 'multipart/form-data; boundary=B0undary').send(body);
    assert.equal(res.status, 400, name);
    assert.match(res.body.error.message, /plain file name|empty filename|no files/);
    assert.equal(registry.registerCalls, 0);
  }
  const { app, registry } = testApp();
  const plain = rawMultipart('B0undary', [{ name: 'id', content: 'x' }, { name: 'f', filename: 'config.json', content: '{}' }]);
  await request(app).post('/v1/deltas').set('content-type', 'multipart/form-data; boundary=B0undary').send(plain).expect(201);
  assert.deepEqual(registry.received.get('x')!.map((f) => f.name), ['config.json']);
});

test('upload problems: missing or bad id 400, no files 400, duplicate file 400, existing id 409, ?replace=true 201, backbone name 400', async () => {
  const { app } = testApp();
  let res = await request(app).post('/v1/deltas').attach('f', CONFIG, 'config.json');
  assert.equal(res.status, 400);
  assert.match(res.body.error.message, /^id: expected a task id/);
  res = await request(app).post('/v1/deltas').field('id', '-bad').attach('f', CONFIG, 'config.json');
  assert.equal(res.status, 400);
  res = await request(app).post('/v1/deltas').field('id', 'ok');
  assert.equal(res.status, 400);
  assert.match(res.body.error.message, /no files/);
  res = await request(app).post('/v1/deltas').field('id', 'ok').attach('a', CONFIG, 'config.json').attach('b', CONFIG, 'config.json');
  assert.equal(res.status, 400);
  assert.match(res.body.error.message, /twice/);
  await request(app).post('/v1/deltas').field('id', 'dup').attach('f', CONFIG, 'config.json').expect(201);
  res = await request(app).post('/v1/deltas').field('id', 'dup').attach('f', CONFIG, 'config.json');
  assert.equal(res.status, 409);
  assert.equal(res.body.error.code, 'delta_exists');
  await request(app).post('/v1/deltas?replace=true').field('id', 'dup').attach('f', WEIGHTS, 'config.json').expect(201);
  res = await request(app).post('/v1/deltas?replace=maybe').field('id', 'dup').attach('f', CONFIG, 'config.json');
  assert.equal(res.status, 400);
  res = await request(app).post('/v1/deltas').field('id', 'test-backbone').attach('f', CONFIG, 'config.json');
  assert.equal(res.status, 400);
  assert.match(res.body.error.message, /backbone's own name/);
});

test('an upload over DELTASERVE_MAX_UPLOAD_BYTES is 413 and leaves nothing behind', async (t) => {
  const uploads = await ownUploads(t);
  const uploadTemps = uploads.count;
  const { app, registry } = testApp({ env: { DELTASERVE_MAX_UPLOAD_BYTES: '1000', ...uploads.env } });
  const before = await uploadTemps();
  // Declared length over the limit: refused before reading.
  let res = await request(app).post('/v1/deltas').field('id', 'big').attach('f', Buffer.alloc(5000), 'w.safetensors');
  assert.equal(res.status, 413);
  assert.equal(res.body.error.code, 'payload_too_large');
  // Chunked (no declared length): refused while streaming, across files.
  const srv = await listen(app);
  try {
    const boundary = 'XyZ';
    const part = (name: string, size: number) =>
      `--${boundary}\r\nContent-Disposition: form-data; name="f"; filename="${name}"\r\n\r\n${'a'.repeat(size)}\r\n`;
    const body = `--${boundary}\r\nContent-Disposition: form-data; name="id"\r\n\r\nbig\r\n` + part('a.bin', 600) + part('b.bin', 600) + `--${boundary}--\r\n`;
    res = await new Promise((resolve, reject) => {
      const req = httpRequest(`${srv.url}/v1/deltas`, { method: 'POST', headers: { 'content-type': `multipart/form-data; boundary=${boundary}`, 'transfer-encoding': 'chunked' } }, (r) => {
        let s = '';
        r.on('data', (c) => (s += c));
        r.on('end', () => resolve({ status: r.statusCode, body: JSON.parse(s) } as never));
      });
      req.on('error', reject);
      req.end(body);
    });
    assert.equal(res.status, 413);
    assert.match(res.body.error.message, /1000 bytes/);
  } finally {
    await srv.close();
  }
  assert.equal(registry.registerCalls, 0);
  assert.equal(await uploadTemps(), before);
});

async function importFixture() {
  const base = await mkdtemp(join(tmpdir(), 'ds-import-test-'));
  const root = join(base, 'imports');
  const outside = join(base, 'outside');
  await mkdir(join(root, 'good'), { recursive: true });
  await mkdir(outside);
  await writeFile(join(root, 'good', 'adapter_config.json'), CONFIG);
  await writeFile(join(root, 'good', 'adapter_model.safetensors'), WEIGHTS);
  await writeFile(join(outside, 'adapter_config.json'), CONFIG);
  await symlink(outside, join(root, 'link-out'));
  // Its listing would show nothing to refuse: only the folder's own real path can.
  await mkdir(join(base, 'outside-empty'));
  await symlink(join(base, 'outside-empty'), join(root, 'link-empty-out'));
  await mkdir(join(root, 'file-link'));
  await symlink(join(outside, 'adapter_config.json'), join(root, 'file-link', 'adapter_config.json'));
  return { base, root, outside };
}

test('import by path is refused with a hint when DELTASERVE_IMPORT_DIR is unset', async () => {
  const { app, registry } = testApp();
  const res = await request(app).post('/v1/deltas').send({ id: 'x', path: '/tmp' });
  assert.equal(res.status, 403);
  assert.match(res.body.error.message, /DELTASERVE_IMPORT_DIR/);
  assert.equal(registry.registerCalls, 0);
});

test('import by path: relative and absolute inside the folder work; outside, "..", and symlinks out are 403 and read nothing', async () => {
  const { root, outside } = await importFixture();
  const { app, registry } = testApp({ env: { DELTASERVE_IMPORT_DIR: root } });
  const ok = await request(app).post('/v1/deltas').send({ id: 'rel', path: 'good' });
  assert.equal(ok.status, 201, JSON.stringify(ok.body));
  assert.deepEqual(registry.received.get('rel')!.map((f) => f.name), ['adapter_config.json', 'adapter_model.safetensors']);
  await request(app).post('/v1/deltas').send({ id: 'abs', path: join(root, 'good') }).expect(201);

  for (const path of [outside, join(root, '..', 'outside'), '../outside', 'link-out', 'link-empty-out', 'file-link', '/etc']) {
    const res = await request(app).post('/v1/deltas').send({ id: 'evil', path });
    assert.equal(res.status, 403, path);
    assert.equal(res.body.error.code, 'forbidden');
  }
  assert.equal(registry.received.has('evil'), false);
  assert.equal(registry.registerCalls, 2);

  const missing = await request(app).post('/v1/deltas').send({ id: 'm', path: 'missing' });
  assert.equal(missing.status, 422);
});

test('vLLM aliases load_lora_adapter / unload_lora_adapter follow the import rules', async () => {
  const { root } = await importFixture();
  const { app, registry } = testApp({ env: { DELTASERVE_IMPORT_DIR: root } });
  const res = await request(app).post('/v1/load_lora_adapter').send({ lora_name: 'sql', lora_path: 'good' });
  assert.equal(res.status, 200);
  assert.match(res.text, /Success: LoRA adapter 'sql' added/);
  assert.ok(registry.records.has('sql'));
  const again = await request(app).post('/v1/load_lora_adapter').send({ lora_name: 'sql', lora_path: 'good' });
  assert.equal(again.status, 409);
  await request(app).post('/v1/load_lora_adapter').send({ lora_name: 'sql', lora_path: 'good', load_inplace: true }).expect(200);
  const out = await request(app).post('/v1/load_lora_adapter').send({ lora_name: 'x', lora_path: 'link-out' });
  assert.equal(out.status, 403);
  assert.equal(out.body.error.type, 'permission_error');
  await request(app).post('/v1/unload_lora_adapter').send({ lora_name: 'sql' }).expect(200);
  assert.equal(registry.records.has('sql'), false);
  assert.equal((await request(app).post('/v1/unload_lora_adapter').send({ lora_name: 'sql' })).status, 404);
});

test('list, inspect, delete', async () => {
  const { app, registry } = testApp();
  await request(app).post('/v1/deltas').field('id', 'sql').attach('f', CONFIG, 'adapter_config.json').expect(201);
  registry.cached.add('sql');
  const list = await request(app).get('/v1/deltas').expect(200);
  assert.equal(list.body.data.length, 1);
  assert.deepEqual(Object.keys(list.body.data[0]).sort(), ['bytes', 'cached', 'created_at', 'format', 'id', 'pinned', 'rank', 'type']);
  assert.equal(list.body.data[0].cached, true);
  const one = await request(app).get('/v1/deltas/sql').expect(200);
  assert.deepEqual(one.body.sites, [{ module: 'model.layers.0.self_attn.q_proj', kind: 'lora', site: 'lora', shapes: [[16, 8], [8, 16]] }]);
  assert.equal(one.body.created_at, list.body.data[0].created_at);
  assert.equal((await request(app).get('/v1/deltas/nope')).body.error.code, 'delta_not_found');
  await request(app).delete('/v1/deltas/sql').expect(204);
  const gone = await request(app).delete('/v1/deltas/sql');
  assert.equal(gone.status, 404);
  assert.equal(gone.body.error.code, 'delta_not_found');
  assert.equal((await request(app).get('/v1/deltas/sql')).status, 404);
});
