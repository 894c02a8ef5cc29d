import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { test } from 'node:test';
import request from 'supertest';
import { createLogger } from '../src/log.js';
import { testApp } from './helpers/http-app.js';

function capture(level: 'info' | 'trace') {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk, _enc, done) {
      lines.push(...String(chunk).split('\n').filter(Boolean));
      done();
    },
  });
  return { lines, logger: createLogger(level, sink) };
}

test('request logs carry the request id and neither prompts nor the admin token, even at trace', async () => {
  for (const level of ['info', 'trace'] as const) {
    const { lines, logger } = capture(level);
    const { app } = testApp({ logger, env: { DELTASERVE_ADMIN_TOKEN: 'tok-SECRET-42' } });
    await request(app).post('/v1/generate').set('x-request-id', 'rid-1').send({ inputs: 'PROMPT-SECRET-1' }).expect(200);
    await request(app).post('/v1/chat/completions').send({ model: 'test-backbone', messages: [{ role: 'user', content: 'PROMPT-SECRET-2' }] }).expect(200);
    await request(app).get('/v1/deltas').set('authorization', 'Bearer tok-SECRET-42').expect(200);
    const all = lines.join('\n');
    assert.doesNotMatch(all, /SECRET/, level);
    const done = lines.map((l) => JSON.parse(l)).find((l) => l.req?.id === 'rid-1' && l.res);
    assert.ok(done, `no completion log for rid-1 at ${level}`);
    assert.equal(done.res.statusCode, 200);
    assert.equal(done.req.url, '/v1/generate');
  }
});

test('probes and scrapes are logged below info', async () => {
  const { lines, logger } = capture('info');
  const { app } = testApp({ logger });
  await request(app).get('/healthz').expect(200);
  await request(app).get('/metrics').expect(200);
  assert.equal(lines.length, 0);
});
