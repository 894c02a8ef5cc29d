/**
 * Admin endpoints on the REAL stack: auth per the contract (token set: none
 * 401, wrong 403; token unset: loopback only), imports by path confined to
 * DELTASERVE_IMPORT_DIR without reading what lies outside, and vLLM's
 * load/unload aliases.
 */
import assert from 'node:assert/strict';
import { readFileSync, statSync, symlinkSync, utimesSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import request from 'supertest';
import { peftLora, scratch, startStack, writeDelta, type Stack } from './helpers/e2e-stack.js';

type App = Stack['services']['app'];

/** One request per admin route, each well-formed enough that only auth stands in the way. */
function adminCalls(app: App, files: Record<string, Buffer>): [string, () => request.Test][] {
  return [
    ['POST /v1/deltas (multipart)', () => request(app).post('/v1/deltas').field('id', 'auth-lora')
      .attach('a', files['adapter_config.json'], 'adapter_config.json').attach('b', files['adapter_model.safetensors'], 'adapter_model.safetensors')],
    ['GET /v1/deltas', () => request(app).get('/v1/deltas')],
    ['GET /v1/deltas/auth-lora', () => request(app).get('/v1/deltas/auth-lora')],
    ['PATCH /v1/deltas/auth-lora', () => request(app).patch('/v1/deltas/auth-lora').send({ pinned: true })],
    ['DELETE /v1/deltas/auth-lora', () => request(app).delete('/v1/deltas/auth-lora')],
    ['POST /v1/deltas (import)', () => request(app).post('/v1/deltas').send({ id: 'x', path: 'x' })],
    ['POST /v1/load_lora_adapter', () => request(app).post('/v1/load_lora_adapter').send({ lora_name: 'x', lora_path: 'x' })],
    ['POST /v1/unload_lora_adapter', () => request(app).post('/v1/unload_lora_adapter').send({ lora_name: 'x' })],
  ];
}

const errorCode = (body: unknown) => (body as { error?: { code?: string } }).error?.code;

describe('e2e: admin auth with DELTASERVE_ADMIN_TOKEN set', () => {
  let stack: Stack;
  before(async () => {
    // Even a loopback peer needs the token once one is set.
    stack = await startStack({ env: { DELTASERVE_ADMIN_TOKEN: 's3cret-token' } });
  });
  after(() => stack?.close());

  test('no token → 401 with WWW-Authenticate, wrong token → 403, right token → served; generation needs none', async () => {
    const app = stack.services.app;
    const files = peftLora(stack.services.backbone.info, 1);
    for (const [name, call] of adminCalls(app, files)) {
      const none = await call();
      assert.equal(none.status, 401, `${name}: ${JSON.stringify(none.body)}`);
      assert.equal(none.headers['www-authenticate'], 'Bearer');
      assert.equal(errorCode(none.body), 'unauthorized', name);
      const wrong = await call().set('Authorization', 'Bearer not-the-token');
      assert.equal(wrong.status, 403, `${name}: ${JSON.stringify(wrong.body)}`);
      assert.equal(errorCode(wrong.body), 'forbidden', name);
      const basic = await call().set('Authorization', 'Basic czNjcmV0LXRva2Vu');
      assert.equal(basic.status, 401, `${name}: a non-Bearer scheme is no token`);
    }
    assert.equal((await request(app).get('/v1/deltas/auth-lora').set('Authorization', 'Bearer s3cret-token')).status, 404, 'nothing was registered without the token');

    const [, upload] = adminCalls(app, files)[0];
    const ok = await upload().set('Authorization', 'Bearer s3cret-token');
    assert.equal(ok.status, 201, JSON.stringify(ok.body));
    const listed = await request(app).get('/v1/deltas').set('Authorization', 'bearer s3cret-token');
    assert.equal(listed.status, 200);
    assert.deepEqual(listed.body.data.map((d: { id: string }) => d.id), ['auth-lora']);
    // Generation and the model list are not admin endpoints.
    await request(app).post('/v1/generate').send({ task: 'auth-lora', inputs: 'hi', parameters: { max_new_tokens: 2 } }).expect(200);
    await request(app).get('/v1/models').expect(200);
    await request(app).delete('/v1/deltas/auth-lora').set('Authorization', 'Bearer s3cret-token').expect(204);
  });
});

describe('e2e: admin without a token, and imports by path', () => {
  let stack: Stack;
  let peer = '127.0.0.1';
  let work: Awaited<ReturnType<typeof scratch>>;
  let importDir: string;
  let outside: string;

  before(async () => {
    work = await scratch('admin');
    importDir = join(work.dir, 'import');
    outside = join(work.dir, 'outside');
    stack = await startStack({ env: { DELTASERVE_IMPORT_DIR: importDir }, remoteAddress: () => peer });
    const info = stack.services.backbone.info;
    await writeDelta(join(importDir, 'good'), peftLora(info, 5));
    await writeDelta(join(importDir, 'other'), peftLora(info, 6));
    await writeDelta(outside, peftLora(info, 7));
    symlinkSync(outside, join(importDir, 'link-out'));
  });
  after(async () => {
    await stack?.close();
    await work?.remove();
  });

  test('token unset: loopback peers (v4, v6, v4-mapped) are served; any other peer is 403 on every admin route', async () => {
    const app = stack.services.app;
    const files = peftLora(stack.services.backbone.info, 1);
    for (const addr of ['10.0.0.5', '192.168.1.20', '203.0.113.7', '2001:db8::1', '::ffff:10.0.0.5']) {
      peer = addr;
      for (const [name, call] of adminCalls(app, files)) {
        const r = await call();
        assert.equal(r.status, 403, `${addr} ${name}: ${JSON.stringify(r.body)}`);
        assert.match(JSON.stringify(r.body), /DELTASERVE_ADMIN_TOKEN/);
      }
      // Generation is open to the network.
      await request(app).post('/v1/generate').send({ inputs: 'hi', parameters: { max_new_tokens: 1 } }).expect(200);
    }
    for (const addr of ['127.0.0.1', '::1', '::ffff:127.0.0.1']) {
      peer = addr;
      assert.equal((await request(app).get('/v1/deltas')).status, 200, addr);
    }
    peer = '127.0.0.1';
  });

  test('an import path outside DELTASERVE_IMPORT_DIR is refused and nothing outside is read', async (t) => {
    const app = stack.services.app;
    const outsideFiles = ['adapter_config.json', 'adapter_model.safetensors'].map((f) => join(outside, f));
    // relatime updates atime on a read when atime ≤ mtime: set atime far in the past, then any read shows.
    const old = new Date(0);
    for (const f of outsideFiles) utimesSync(f, old, statSync(f).mtime);
    const control = join(work.dir, 'control');
    await writeDelta(control, { probe: Buffer.from('x') });
    utimesSync(join(control, 'probe'), old, statSync(join(control, 'probe')).mtime);
    readFileSync(join(control, 'probe'));
    const atimeTracked = statSync(join(control, 'probe')).atimeMs !== 0;

    const attempts: [string, request.Test][] = [
      ['absolute path outside', request(app).post('/v1/deltas').send({ id: 'out-abs', path: outside })],
      ['relative ..', request(app).post('/v1/deltas').send({ id: 'out-rel', path: '../outside' })],
      ['.. inside an absolute path', request(app).post('/v1/deltas').send({ id: 'out-dots', path: join(importDir, '..', 'outside') })],
      ['symlink inside pointing out', request(app).post('/v1/deltas').send({ id: 'out-link', path: 'link-out' })],
      ['vLLM load outside', request(app).post('/v1/load_lora_adapter').send({ lora_name: 'out-vllm', lora_path: outside })],
      ['vLLM load via symlink', request(app).post('/v1/load_lora_adapter').send({ lora_name: 'out-vllm2', lora_path: join(importDir, 'link-out') })],
      ['/etc', request(app).post('/v1/deltas').send({ id: 'etc', path: '/etc' })],
    ];
    for (const [name, req] of attempts) {
      const r = await req;
      assert.ok(r.status === 403 || r.status === 422, `${name}: ${r.status} ${JSON.stringify(r.body)}`);
      assert.ok(r.body.error, name);
    }
    const listed = (await request(app).get('/v1/deltas').expect(200)).body.data.map((d: { id: string }) => d.id);
    assert.deepEqual(listed, [], 'nothing registered');
    if (atimeTracked) {
      for (const f of outsideFiles) assert.equal(statSync(f).atimeMs, 0, `${f} was read`);
    } else {
      t.diagnostic('this filesystem does not update atime on reads; "reads nothing" checked by the refusals only');
    }

    const missing = await request(app).post('/v1/deltas').send({ id: 'missing', path: 'no-such-folder' });
    assert.equal(missing.status, 422);
  });

  test('import by path inside the folder, and vLLM load/unload_lora_adapter', async () => {
    const app = stack.services.app;
    const byPath = await request(app).post('/v1/deltas').send({ id: 'imported', path: 'good' });
    assert.equal(byPath.status, 201, JSON.stringify(byPath.body));
    assert.equal(byPath.body.format, 'peft');
    const absolute = await request(app).post('/v1/deltas').send({ id: 'imported-abs', path: join(importDir, 'other') });
    assert.equal(absolute.status, 201, JSON.stringify(absolute.body));

    const load = await request(app).post('/v1/load_lora_adapter').send({ lora_name: 'vllm-lora', lora_path: join(importDir, 'good') });
    assert.equal(load.status, 200, load.text);
    assert.match(load.text, /vllm-lora/);
    const dup = await request(app).post('/v1/load_lora_adapter').send({ lora_name: 'vllm-lora', lora_path: 'other' });
    assert.equal(dup.status, 409);
    assert.equal(dup.body.error.code, 'delta_exists');
    const before = (await request(app).get('/v1/deltas/vllm-lora').expect(200)).body.sha256;
    const asGood = (await request(app).post('/v1/completions').send({ model: 'vllm-lora', prompt: 'Hello', max_tokens: 8, temperature: 0 }).expect(200)).body;
    const inplace = await request(app).post('/v1/load_lora_adapter').send({ lora_name: 'vllm-lora', lora_path: 'other', load_inplace: true });
    assert.equal(inplace.status, 200, inplace.text);
    assert.notEqual((await request(app).get('/v1/deltas/vllm-lora').expect(200)).body.sha256, before, 'a new version');

    const a = (await request(app).post('/v1/completions').send({ model: 'vllm-lora', prompt: 'Hello', max_tokens: 8, temperature: 0 }).expect(200)).body;
    const b = (await request(app).post('/v1/completions').send({ model: 'imported-abs', prompt: 'Hello', max_tokens: 8, temperature: 0 }).expect(200)).body;
    assert.equal(a.choices[0].text, b.choices[0].text, 'replaced in place by "other": the same files give the same output');
    assert.notEqual(a.choices[0].text, asGood.choices[0].text, 'and not the old version\'s');

    const unload = await request(app).post('/v1/unload_lora_adapter').send({ lora_name: 'vllm-lora' });
    assert.equal(unload.status, 200, unload.text);
    const gone = await request(app).post('/v1/unload_lora_adapter').send({ lora_name: 'vllm-lora' });
    assert.equal(gone.status, 404);
    assert.equal(gone.body.error.type, 'not_found_error');
    const bad = await request(app).post('/v1/load_lora_adapter').send({ lora_name: 'bad name', lora_path: 'good' });
    assert.equal(bad.status, 400);
    const run = await request(app).post('/v1/completions').send({ model: 'vllm-lora', prompt: 'Hello', max_tokens: 2 });
    assert.equal(run.status, 404);
    assert.equal(run.body.error.code, 'model_not_found');
  });
});

describe('e2e: pinning and pages on the real stack', () => {
  let stack: Stack;
  before(async () => {
    stack = await startStack({});
  });
  after(() => stack?.close());

  test('PATCH pins (shown in GET, held in the cache, counted in /metrics as ever); bad bodies 400; pages follow has_more', async () => {
    const app = stack.services.app;
    const info = stack.services.backbone.info;
    for (const [i, id] of ['p-a', 'p-b', 'p-c'].entries()) {
      const f = peftLora(info, 20 + i);
      await request(app).post('/v1/deltas').field('id', id).attach('a', f['adapter_config.json'], 'adapter_config.json')
        .attach('b', f['adapter_model.safetensors'], 'adapter_model.safetensors').expect(201);
    }
    const pinned = await request(app).patch('/v1/deltas/p-b').send({ pinned: true }).expect(200);
    assert.equal(pinned.body.pinned, true);
    assert.equal(pinned.body.cached, true, 'a pinned delta is loaded at once');
    assert.equal((await request(app).get('/v1/deltas/p-b').expect(200)).body.pinned, true);
    await request(app).post('/v1/generate').send({ task: 'p-b', inputs: 'hi', parameters: { max_new_tokens: 2 } }).expect(200);

    for (const body of [{}, { pinned: 'yes' }]) {
      const bad = await request(app).patch('/v1/deltas/p-b').send(body);
      assert.equal(bad.status, 400, JSON.stringify(bad.body));
      assert.match(bad.body.error.message, /pinned/);
    }
    assert.equal((await request(app).patch('/v1/deltas/nope').send({ pinned: true })).body.error.code, 'delta_not_found');

    const first = await request(app).get('/v1/deltas?limit=2').expect(200);
    assert.deepEqual(first.body.data.map((d: { id: string }) => d.id), ['p-a', 'p-b']);
    assert.equal(first.body.has_more, true);
    assert.equal(first.body.last_id, 'p-b');
    const rest = await request(app).get(`/v1/deltas?limit=2&after=${first.body.last_id}`).expect(200);
    assert.deepEqual(rest.body.data.map((d: { id: string }) => d.id), ['p-c']);
    assert.equal(rest.body.has_more, false);
    for (const q of ['limit=0', 'limit=abc', 'limit=1001', 'after=..%2Fx']) {
      const bad = await request(app).get(`/v1/deltas?${q}`);
      assert.equal(bad.status, 400, `${q}: ${JSON.stringify(bad.body)}`);
    }
    const models = await request(app).get('/v1/models?limit=2').expect(200);
    assert.deepEqual(models.body.data.map((m: { id: string }) => m.id), [info.name, 'p-a']);
    assert.equal(models.body.has_more, true);
    const one = await request(app).get('/v1/models?limit=1').expect(200);
    const next = await request(app).get(`/v1/models?limit=5&after=${encodeURIComponent(one.body.last_id)}`).expect(200);
    assert.deepEqual(next.body.data.map((m: { id: string }) => m.id), ['p-a', 'p-b', 'p-c'], 'after the backbone come the deltas');
    assert.equal((await request(app).get('/v1/models').expect(200)).body.data.length, 4, 'without a limit, every model');
    const metrics = await request(app).get('/metrics').expect(200);
    assert.match(metrics.text, /^deltaserve_deltas_registered 3$/m);

    const unpinned = await request(app).patch('/v1/deltas/p-b').send({ pinned: false }).expect(200);
    assert.equal(unpinned.body.pinned, false);
    for (const id of ['p-a', 'p-b', 'p-c']) await request(app).delete(`/v1/deltas/${id}`).expect(204);
  });
});

describe('e2e: imports by path with DELTASERVE_IMPORT_DIR unset', () => {
  let stack: Stack;
  before(async () => {
    stack = await startStack();
  });
  after(() => stack?.close());

  test('are refused with 403, naming the variable', async () => {
    for (const req of [
      request(stack.services.app).post('/v1/deltas').send({ id: 'x', path: '/tmp' }),
      request(stack.services.app).post('/v1/load_lora_adapter').send({ lora_name: 'x', lora_path: '/tmp' }),
    ]) {
      const r = await req;
      assert.equal(r.status, 403, JSON.stringify(r.body));
      assert.match(JSON.stringify(r.body), /DELTASERVE_IMPORT_DIR/);
    }
  });
});
