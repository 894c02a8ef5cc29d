/**
 * The real server as a child process, the way it is deployed: `npm start` on a
 * clean environment answers its probes and a generation; `deltaserve serve`
 * answers probes while the backbone loads (readiness 503, not a refused
 * connection); SIGTERM during a stream lets the stream complete, refuses new
 * requests with 503 and exits 0.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { openStream, pollUntil, scratch, sseData, spawnInRepo } from './helpers/e2e-stack.js';

const post = (url: string, body: unknown) =>
  fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });

test('a clean clone passes: `npm start` answers /healthz, /readyz and /v1/generate with the deltas in ./deltas', { timeout: 90_000 }, async () => {
  const work = await scratch('npm-start');
  // Only PORT (0: any free port) and a private model cache; everything else is the default.
  const server = spawnInRepo('npm', ['start'], { PORT: '0', DELTASERVE_CACHE_DIR: join(work.dir, 'cache') });
  try {
    const url = await server.listening;
    await pollUntil(`${url}/readyz`, (s) => s === 200);
    const health = await fetch(`${url}/healthz`);
    assert.equal(health.status, 200);
    assert.deepEqual(await health.json(), { status: 'ok' });
    assert.equal((await fetch(`${url}/readyz`)).status, 200);

    const backbone = (await (await fetch(`${url}/v1/backbone`)).json()) as { name: string };
    assert.equal(backbone.name, 'demo:llama', 'npm start serves the embedded demo (demo = demo:llama)');

    const bare = await post(`${url}/v1/generate`, { inputs: 'Hello', parameters: { max_new_tokens: 8 } });
    assert.equal(bare.status, 200);
    const b = (await bare.json()) as { generated_text: string; details: { generated_tokens: number } };
    assert.ok(b.details.generated_tokens >= 1);
    const withLora = await post(`${url}/v1/generate`, { task: 'demo-lora', inputs: 'Hello', parameters: { max_new_tokens: 8 } });
    assert.equal(withLora.status, 200, 'the demo deltas in ./deltas are served');
    const models = (await (await fetch(`${url}/v1/models`)).json()) as { data: { id: string }[] };
    assert.deepEqual(models.data.map((m) => m.id).sort(), ['demo-adapter', 'demo-bitfit', 'demo-lora', 'demo:llama']);
  } finally {
    server.signal('SIGTERM');
    const timer = setTimeout(() => void server.kill(), 15_000);
    await server.exited;
    clearTimeout(timer);
    await work.remove();
  }
});

test('`deltaserve serve` listens before the backbone is loaded: /healthz 200, /readyz 503 starting, generation 503 not_ready', { timeout: 60_000 }, async () => {
  const work = await scratch('starting');
  // A fresh cache folder: the backbone is generated, then loaded and warmed, while the probes are polled.
  const server = spawnInRepo(process.execPath, ['--import', 'tsx', 'src/cli.ts', 'serve'], {
    HOST: '127.0.0.1', PORT: '0', DELTASERVE_MODEL: 'demo:gpt2',
    DELTASERVE_DELTAS_DIR: join(work.dir, 'deltas'), DELTASERVE_CACHE_DIR: join(work.dir, 'cache'),
  });
  try {
    const url = await server.listening;
    const first = await fetch(`${url}/readyz`);
    const early = { ready: first.status, body: await first.json() };
    const health = await fetch(`${url}/healthz`);
    const gen = await post(`${url}/v1/generate`, { inputs: 'x' });
    const genBody = (await gen.json()) as { error: { code: string } };
    const seen = await pollUntil(`${url}/readyz`, (s) => s === 200);
    assert.deepEqual(early, { ready: 503, body: { status: 'starting' } }, `the first readiness answer comes before the load ends (log:\n${server.output()})`);
    assert.equal(health.status, 200, 'alive while loading');
    assert.equal(gen.status, 503);
    assert.equal(genBody.error.code, 'not_ready');
    assert.ok(Number(gen.headers.get('retry-after')) >= 1);
    assert.equal(seen.at(-1), 200, 'then ready');
    assert.equal((await post(`${url}/v1/generate`, { inputs: 'x', parameters: { max_new_tokens: 2 } })).status, 200);
  } finally {
    await server.kill();
    await work.remove();
  }
});

test('SIGTERM during a stream: the stream completes, new requests get 503, exit code 0', { timeout: 60_000 }, async () => {
  const work = await scratch('sigterm');
  const server = spawnInRepo(process.execPath, ['--import', 'tsx', 'src/cli.ts', 'serve'], {
    HOST: '127.0.0.1', PORT: '0', DELTASERVE_MODEL: 'demo:gpt2',
    DELTASERVE_DELTAS_DIR: join(work.dir, 'deltas'), DELTASERVE_CACHE_DIR: join(work.dir, 'cache'),
  });
  try {
    const url = await server.listening;
    await pollUntil(`${url}/readyz`, (s) => s === 200);
    const s = openStream(`${url}/v1/generate`, { inputs: 'Tell me a long story', parameters: { max_new_tokens: 1000 }, stream: true });
    assert.equal(await s.status, 200);
    let ended = 0;
    const body = s.done.then((b) => {
      ended = performance.now();
      return b;
    });
    await s.firstEvent;

    server.child.kill('SIGTERM');
    const readiness = await pollUntil(`${url}/readyz`, (st) => st === 503, 10_000);
    assert.equal(readiness.at(-1), 503);
    const refused = await post(`${url}/v1/generate`, { inputs: 'one more?' });
    const refusedAt = performance.now();
    assert.equal(refused.status, 503);
    assert.equal(((await refused.json()) as { error: { code: string } }).error.code, 'draining');
    const chat = await post(`${url}/v1/chat/completions`, { model: 'demo:gpt2', messages: [{ role: 'user', content: 'x' }] });
    assert.equal(chat.status, 503);
    assert.equal((await fetch(`${url}/healthz`)).status, 200, 'alive while draining');

    const events = sseData(await body).map((d) => JSON.parse(d));
    assert.ok(ended > refusedAt, 'the stream was still running when new requests were refused');
    const last = events.at(-1);
    assert.ok(last.details, `the stream completed with its final event (got ${JSON.stringify(last)})`);
    assert.equal(events.length, last.details.generated_tokens);
    assert.equal(last.generated_text, events.map((e) => e.token.text).join(''));
    assert.ok(last.details.generated_tokens > 100, 'a long stream, not one cut short');

    const exit = await server.exited;
    assert.deepEqual(exit, { code: 0, signal: null }, server.output());
    assert.match(server.output(), /"msg":"stopped"/);
  } finally {
    await server.kill();
    await work.remove();
  }
});
