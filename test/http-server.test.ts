import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { request as httpRequest } from 'node:http';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { serve } from '../src/http/server.js';
import { createLogger } from '../src/log.js';
import { sseData, testApp } from './helpers/http-app.js';

/** Starts a streamed /v1/generate; resolves with its whole body once it ends. `started` fires on the first bytes. */
function stream(url: string, inputs: string): { started: Promise<void>; done: Promise<string> } {
  let onStart!: () => void;
  const started = new Promise<void>((r) => (onStart = r));
  const done = new Promise<string>((resolve, reject) => {
    const req = httpRequest(`${url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' } }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        body += c;
        onStart();
      });
      res.on('end', () => resolve(body));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(JSON.stringify({ inputs, stream: true }));
  });
  return { started, done };
}

const lastEvent = (body: string) => JSON.parse(sseData(body).at(-1)!);

test('shutdown: the running stream completes, new requests get 503 draining, then exit(0)', async () => {
  const { app, lifecycle } = testApp({ echo: { tokenDelayMs: 20 } });
  const exits: number[] = [];
  const running = await serve(app, { host: '127.0.0.1', port: 0, drainSeconds: 10 }, {
    lifecycle, logger: createLogger('silent'), signals: [], exit: (c) => exits.push(c),
  });
  const s = stream(running.url, 'x'.repeat(25));
  await s.started;
  const stopping = running.shutdown();
  const refused = await fetch(`${running.url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"inputs":"a"}' });
  assert.equal(refused.status, 503);
  assert.equal(((await refused.json()) as { error: { code: string } }).error.code, 'draining');
  assert.equal((await fetch(`${running.url}/readyz`)).status, 503);
  const last = lastEvent(await s.done);
  assert.equal(last.details.generated_tokens, 25);
  await stopping;
  assert.deepEqual(exits, [0]);
  assert.equal(running.server.listening, false);
});

test('shutdown: past DELTASERVE_DRAIN_SECONDS running requests are cut and the process still exits 0', async () => {
  const { app, lifecycle } = testApp({ echo: { tokenDelayMs: 50 } });
  const exits: number[] = [];
  const running = await serve(app, { host: '127.0.0.1', port: 0, drainSeconds: 0 }, {
    lifecycle, logger: createLogger('silent'), signals: [], exit: (c) => exits.push(c),
  });
  const s = stream(running.url, 'x'.repeat(200));
  await s.started;
  const t0 = Date.now();
  await running.shutdown();
  assert.ok(Date.now() - t0 < 2000);
  assert.deepEqual(exits, [0]);
  await s.done.catch(() => '');
});

test('SIGTERM to a real server process during a stream: stream completes, new requests 503, exit code 0', async () => {
  const fixture = fileURLToPath(new URL('./helpers/http-serve-fixture.ts', import.meta.url));
  const child = spawn(process.execPath, ['--import', 'tsx', fixture], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    const [chunk] = (await once(child.stdout, 'data')) as [Buffer];
    const url = chunk.toString().trim();
    assert.match(url, /^http:\/\/127\.0\.0\.1:\d+$/);
    const s = stream(url, 'y'.repeat(30));
    await s.started;
    const exited = once(child, 'exit');
    child.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 50));
    const refused = await fetch(`${url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"inputs":"a"}' });
    assert.equal(refused.status, 503);
    assert.equal(lastEvent(await s.done).generated_text, 'y'.repeat(30));
    const [code, signal] = await exited;
    assert.equal(signal, null);
    assert.equal(code, 0);
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
});
