import assert from 'node:assert/strict';
import { networkInterfaces } from 'node:os';
import { test } from 'node:test';
import request from 'supertest';
import { isLoopback } from '../src/http/auth.js';
import { listen, testApp } from './helpers/http-app.js';

const TOKEN = { DELTASERVE_ADMIN_TOKEN: 'correct-horse' };

test('isLoopback: 127.0.0.0/8, ::1 and IPv4-mapped loopback only', () => {
  for (const a of ['127.0.0.1', '127.8.9.10', '::1', '0:0:0:0:0:0:0:1', '::ffff:127.0.0.1', '::FFFF:127.1.2.3']) assert.equal(isLoopback(a), true, a);
  for (const a of ['10.0.0.1', '::ffff:10.0.0.1', '128.0.0.1', '::2', 'fe80::1', '', undefined, 'localhost', '127.0.0.1.evil']) {
    assert.equal(isLoopback(a), false, String(a));
  }
});

test('with a token: 401 without it (WWW-Authenticate), 403 when wrong, 200 when right, from any address', async () => {
  const { app } = testApp({ env: TOKEN, remoteAddress: () => '203.0.113.9' });
  const none = await request(app).get('/v1/deltas');
  assert.equal(none.status, 401);
  assert.equal(none.body.error.code, 'unauthorized');
  assert.equal(none.headers['www-authenticate'], 'Bearer');
  assert.equal((await request(app).get('/v1/deltas').set('authorization', 'Basic Y29ycmVjdC1ob3JzZQ==')).status, 401);
  const wrong = await request(app).get('/v1/deltas').set('authorization', 'Bearer correct-horsf');
  assert.equal(wrong.status, 403);
  assert.equal(wrong.body.error.code, 'forbidden');
  assert.equal((await request(app).get('/v1/deltas').set('authorization', 'Bearer correct-hors')).status, 403);
  await request(app).get('/v1/deltas').set('authorization', 'Bearer correct-horse').expect(200);
  await request(app).delete('/v1/deltas/x').expect(401);
  await request(app).post('/v1/load_lora_adapter').send({ lora_name: 'a', lora_path: 'b' }).expect(401);
  await request(app).post('/v1/unload_lora_adapter').send({ lora_name: 'a' }).expect(401);
});

test('without a token: non-loopback peers get 403 on every admin endpoint, and a hint', async () => {
  for (const addr of ['10.1.2.3', '::ffff:192.168.0.7', '2001:db8::1']) {
    const { app, registry } = testApp({ remoteAddress: () => addr });
    const res = await request(app).get('/v1/deltas');
    assert.equal(res.status, 403, addr);
    assert.match(res.body.error.message, /DELTASERVE_ADMIN_TOKEN/);
    await request(app).post('/v1/deltas').field('id', 'x').attach('f', Buffer.from('{}'), 'config.json').expect(403);
    await request(app).get('/v1/deltas/x').expect(403);
    await request(app).delete('/v1/deltas/x').expect(403);
    assert.equal(registry.registerCalls, 0);
  }
});

test('without a token: X-Forwarded-For cannot pass a remote peer off as loopback', async () => {
  const { app } = testApp({ remoteAddress: undefined });
  // supertest connects over loopback, so this is allowed by the socket...
  await request(app).get('/v1/deltas').set('x-forwarded-for', '10.0.0.1').expect(200);
  const remote = testApp({ remoteAddress: () => '10.0.0.1' }).app;
  // ...and a remote socket stays remote whatever the header says.
  await request(remote).get('/v1/deltas').set('x-forwarded-for', '127.0.0.1').expect(403);
});

test('public endpoints need no auth from remote peers', async () => {
  const { app } = testApp({ remoteAddress: () => '10.0.0.1', env: TOKEN });
  await request(app).get('/healthz').expect(200);
  await request(app).get('/v1/models').expect(200);
  await request(app).get('/v1/backbone').expect(200);
  await request(app).post('/v1/generate').send({ inputs: 'a' }).expect(200);
});

test('a real server on 127.0.0.1 admits loopback admin requests', async () => {
  const srv = await listen(testApp().app, '127.0.0.1');
  try {
    const res = await fetch(`${srv.url}/v1/deltas`);
    assert.equal(res.status, 200);
  } finally {
    await srv.close();
  }
});

const externalV4 = Object.values(networkInterfaces()).flat().find((i) => i && i.family === 'IPv4' && !i.internal)?.address;

test('a real server reached over a non-loopback interface refuses admin requests', { skip: externalV4 ? false : 'no non-loopback IPv4 interface here' }, async () => {
  const srv = await listen(testApp().app, externalV4!);
  try {
    const res = await fetch(`${srv.url}/v1/deltas`);
    assert.equal(res.status, 403);
    assert.equal(((await res.json()) as { error: { code: string } }).error.code, 'forbidden');
  } finally {
    await srv.close();
  }
});
