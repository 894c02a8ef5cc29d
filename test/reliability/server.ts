/**
 * The reliability suite's categories that need a listening server: fuzzed
 * requests on every route, overload, slow clients, faults behind the server's
 * back, SIGKILL during writes, and the soak. The server is the real stack
 * (demo:gpt2) behind the real `serve()` (its timeouts included).
 */
import { once } from 'node:events';
import { mkdir, readdir, rm, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import fc from 'fast-check';
import type { BackboneInfo } from '../../src/backbone/types.js';
import { serve, type RunningServer } from '../../src/http/server.js';
import { createLogger } from '../../src/log.js';
import { peftLora, spawnInRepo, startStack, uploadDelta, type Stack } from '../helpers/e2e-stack.js';
import { newResult, percentile, Rng, withTimeout, type CategoryResult } from './common.js';

export interface Target {
  stack: Stack;
  running: RunningServer;
  url: string;
  uploads: string;
  close(): Promise<void>;
}

export async function startTarget(dir: string, env: Record<string, string> = {}): Promise<Target> {
  const uploads = join(dir, 'uploads');
  await mkdir(uploads, { recursive: true });
  const stack = await startStack({ env: { DELTASERVE_UPLOAD_TMP_DIR: uploads, DELTASERVE_MAX_UPLOAD_BYTES: '8MiB', ...env } });
  const running = await serve(stack.services.app, { host: '127.0.0.1', port: 0, drainSeconds: 1, requestTimeoutSeconds: 3 }, {
    lifecycle: stack.services.lifecycle, logger: createLogger('silent'), signals: [], exit: () => {},
  });
  return {
    stack, running, url: running.url, uploads,
    close: async () => {
      await running.shutdown();
      await stack.close();
    },
  };
}

/**
 * /healthz latencies (ms) from a worker thread with `concurrency` clients for `ms`: the event loop's health,
 * measured from outside it. A probe that fails counts as 1e9 ms; why it failed is pushed to `failed`.
 */
export async function probeHealth(url: string, concurrency: number, ms: number, failed: string[] = []): Promise<number[]> {
  const code = `
    const { parentPort, workerData } = require('node:worker_threads');
    const { url, concurrency, ms } = workerData;
    const lat = [];
    const failed = [];
    const end = Date.now() + ms;
    async function loop() {
      while (Date.now() < end) {
        const t = performance.now();
        try {
          const r = await fetch(url);
          await r.arrayBuffer();
          lat.push(r.status === 200 ? performance.now() - t : 1e9);
          if (r.status !== 200) failed.push('status ' + r.status);
        } catch (e) {
          lat.push(1e9);
          failed.push(String(e.cause?.code ?? e.cause?.message ?? e.message));
        }
      }
    }
    Promise.all(Array.from({ length: concurrency }, loop)).then(() => parentPort.postMessage({ lat, failed }));`;
  const worker = new Worker(code, { eval: true, workerData: { url: `${url}/healthz`, concurrency, ms } });
  const [res] = (await once(worker, 'message')) as [{ lat: number[]; failed: string[] }];
  await worker.terminate();
  failed.push(...res.failed);
  return res.lat;
}

/**
 * `clients` loops of /v1/generate (every other one streaming) for `ms`, from a worker thread: the
 * clients' own work (fetch, reading streams) stays off the server's event loop, as it would in another process.
 */
export async function generateLoad(url: string, clients: number, ms: number): Promise<number> {
  const code = `
    const { parentPort, workerData } = require('node:worker_threads');
    const { url, clients, ms } = workerData;
    const end = Date.now() + ms;
    let answered = 0;
    async function loop(k) {
      while (Date.now() < end) {
        const r = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ inputs: 'load ' + k, parameters: { max_new_tokens: 8 }, stream: k % 2 === 0 }) });
        await r.arrayBuffer();
        if (r.status === 200) answered++;
      }
    }
    Promise.all(Array.from({ length: clients }, (_, k) => loop(k))).then(() => parentPort.postMessage(answered));`;
  const worker = new Worker(code, { eval: true, workerData: { url: `${url}/v1/generate`, clients, ms } });
  const [answered] = (await once(worker, 'message')) as [number];
  await worker.terminate();
  return answered;
}

const rssMb = () => process.memoryUsage().rss / 2 ** 20;

// --- fuzzed requests ----------------------------------------------------------------

const wild = fc.oneof(
  fc.jsonValue({ maxDepth: 2 }),
  fc.constantFrom(null, -1, 0, 1, 2 ** 53, 1e308, -1e308, 0.5, 'x', '', '\u0000', '\ud800', [], {}, true, 'a'.repeat(5000)),
);
const maybe = <T>(valid: fc.Arbitrary<T>) => fc.oneof({ weight: 5, arbitrary: valid }, { weight: 1, arbitrary: wild }, { weight: 1, arbitrary: fc.constant(undefined) });
const taskName = fc.constantFrom('fuzz-a', 'demo:gpt2', 'nope', '../etc', 'fuzz-a/x', 'ｆuzz-a', '', 'a'.repeat(200));
const small = fc.integer({ min: 0, max: 6 });
const text = fc.oneof(fc.string({ maxLength: 40 }), fc.constantFrom('hello', '', '\u0000\u0001', '😀'.repeat(20), 'x'.repeat(3000)));
const params = fc.record({
  max_new_tokens: maybe(small), temperature: maybe(fc.double({ min: 0, max: 2, noNaN: true })), top_p: maybe(fc.double({ min: 0, max: 1, noNaN: true })),
  top_k: maybe(fc.integer({ min: 0, max: 50 })), seed: maybe(fc.integer({ min: 0, max: 1000 })), stop: maybe(fc.array(text, { maxLength: 3 })),
  repetition_penalty: maybe(fc.double({ min: 0.5, max: 2, noNaN: true })), details: maybe(fc.boolean()), top_n_tokens: maybe(fc.integer({ min: 0, max: 6 })),
  do_sample: maybe(fc.boolean()), adapter_id: maybe(taskName),
}, { requiredKeys: [] });
const messages = fc.array(fc.record({ role: maybe(fc.constantFrom('system', 'user', 'assistant', 'tool', 'robot')), content: maybe(text) }), { maxLength: 3 });

const ROUTES: Record<string, fc.Arbitrary<unknown>> = {
  '/v1/generate': fc.record({ task: maybe(taskName), inputs: maybe(text), parameters: maybe(params), stream: maybe(fc.boolean()) }, { requiredKeys: [] }),
  '/generate': fc.record({ inputs: maybe(text), parameters: maybe(params) }, { requiredKeys: [] }),
  '/generate_stream': fc.record({ inputs: maybe(text), parameters: maybe(params) }, { requiredKeys: [] }),
  '/': fc.record({ inputs: maybe(text), parameters: maybe(params), stream: maybe(fc.boolean()) }, { requiredKeys: [] }),
  '/v1/completions': fc.record({
    model: maybe(taskName), prompt: maybe(fc.oneof(text, fc.array(text, { maxLength: 2 }))), max_tokens: maybe(small), stream: maybe(fc.boolean()),
    logprobs: maybe(fc.integer({ min: 0, max: 6 })), temperature: maybe(fc.double({ min: 0, max: 2, noNaN: true })), n: maybe(fc.integer({ min: 0, max: 3 })),
    echo: maybe(fc.boolean()), stream_options: maybe(fc.record({ include_usage: fc.boolean() })),
  }, { requiredKeys: [] }),
  '/v1/chat/completions': fc.record({
    model: maybe(taskName), messages: maybe(messages), max_tokens: maybe(small), max_completion_tokens: maybe(small), stream: maybe(fc.boolean()),
    logprobs: maybe(fc.boolean()), top_logprobs: maybe(fc.integer({ min: 0, max: 6 })), tool_choice: maybe(fc.constantFrom('none', 'auto', 'required')),
    tools: maybe(fc.array(fc.jsonValue({ maxDepth: 1 }), { maxLength: 1 })), response_format: maybe(fc.record({ type: fc.constantFrom('text', 'json_object') })),
  }, { requiredKeys: [] }),
  '/v1/deltas': fc.record({ id: maybe(taskName), path: maybe(fc.constantFrom('x', '../x', '/etc', '\u0000')) }, { requiredKeys: [] }),
  '/v1/load_lora_adapter': fc.record({ lora_name: maybe(taskName), lora_path: maybe(fc.constantFrom('x', '../x')), load_inplace: maybe(fc.boolean()) }, { requiredKeys: [] }),
  '/v1/unload_lora_adapter': fc.record({ lora_name: maybe(fc.constantFrom('nope', '../x', '')) }, { requiredKeys: [] }),
};
const GETS = ['/healthz', '/readyz', '/metrics', '/v1/models', '/v1/backbone', '/v1/deltas', '/info', '/', '/console/'];
const RAW = fc.oneof(
  fc.constant('{"inputs":'), fc.constant('null'), fc.constant('"hi"'), fc.constant('[1,2]'), fc.constant('{"inputs":"a","inputs":"b"}'),
  fc.string({ maxLength: 200 }), fc.constant('\u0000'.repeat(100)),
);

interface FuzzCase {
  method: string;
  path: string;
  body?: string;
  headers: Record<string, string>;
  kind: string;
}

function caseArb(): fc.Arbitrary<FuzzCase> {
  const json = fc.constantFrom(...Object.keys(ROUTES)).chain((path) =>
    ROUTES[path].map((b) => ({ method: 'POST', path, body: JSON.stringify(b), headers: { 'content-type': 'application/json' }, kind: `POST ${path}` })));
  const raw = fc.tuple(fc.constantFrom(...Object.keys(ROUTES)), RAW, fc.constantFrom('application/json', 'text/plain', 'application/json; charset=latin1', 'gzip')).map(
    ([path, body, ct]) => ({
      method: 'POST', path, body,
      headers: ct === 'gzip' ? { 'content-type': 'application/json', 'content-encoding': 'gzip' } : { 'content-type': ct },
      kind: 'POST raw body',
    }));
  const get = fc.oneof(
    fc.constantFrom(...GETS).map((path) => ({ method: 'GET', path, headers: {}, kind: `GET ${path}` })),
    fc.string({ maxLength: 30 }).map((id) => ({ method: 'GET', path: `/v1/deltas/${encodeURIComponent(id)}`, headers: {}, kind: 'GET /v1/deltas/{id}' })),
    fc.string({ maxLength: 30 }).map((id) => ({ method: 'GET', path: `/v1/models/${encodeURIComponent(id)}`, headers: {}, kind: 'GET /v1/models/{id}' })),
    fc.string({ maxLength: 30 }).filter((id) => id !== 'fuzz-a').map((id) => ({ method: 'DELETE', path: `/v1/deltas/${encodeURIComponent(id)}`, headers: {}, kind: 'DELETE /v1/deltas/{id}' })),
  );
  const as = (a: fc.Arbitrary<unknown>) => a as fc.Arbitrary<FuzzCase>;
  return fc.oneof({ weight: 6, arbitrary: as(json) }, { weight: 1, arbitrary: as(raw) }, { weight: 2, arbitrary: as(get) });
}

async function send(url: string, c: FuzzCase, timeoutMs: number): Promise<{ status: number; body: string }> {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), timeoutMs);
  try {
    const r = await fetch(`${url}${c.path}`, { method: c.method, headers: c.headers, body: c.body, signal: ctl.signal });
    return { status: r.status, body: await r.text() };
  } finally {
    clearTimeout(timer);
  }
}

/** Multipart uploads with hostile ids and filenames: `..`, `/`, NUL, unicode lookalikes. */
const NAMES = ['../adapter_config.json', 'a/adapter_model.safetensors', 'adapter_config.json\u0000', '..', '.', '', 'аdapter_config.json', 'adapter_config.json ', 'CON', 'x'.repeat(300)];
const IDS = ['..', '../x', 'a/b', 'a\u0000b', 'ｆuzz', 'fuzz\u200b', '-x', 'x'.repeat(129), 'ok-id', 'demo:gpt2', ''];

export async function fuzzRequests(t: Target, cases: number, seed: number, concurrency = 12): Promise<CategoryResult> {
  const result = newResult('requests on every route (fuzzed)');
  const info = t.stack.services.backbone.info;
  const files = peftLora(info, 3, { bScale: 0.05 });
  const up = await uploadDelta(t.url, 'fuzz-a', files);
  if (up.status !== 201) throw new Error(`could not register the fuzz delta: ${await up.text()}`);
  const all = fc.sample(caseArb(), { numRuns: cases, seed });
  const rng = new Rng(seed);
  let next = 0;
  const worker = async () => {
    while (next < all.length) {
      const i = next++;
      // One case in twenty is a hostile multipart upload instead.
      const c = i % 20 === 19 ? null : all[i];
      const kind = c ? c.kind : 'POST /v1/deltas multipart (hostile names)';
      result.cases++;
      result.byKind[kind] = (result.byKind[kind] ?? 0) + 1;
      try {
        let status: number;
        let body: string;
        // A hang is no answer within 3 minutes: TGI's routes default max_new_tokens to the whole context (1024
        // tokens here), which on a 2-core machine at load 17 took over a minute (14 of 1000 cases passed 60 s).
        if (c) ({ status, body } = await send(t.url, c, 180_000));
        else {
          const name = rng.pick(NAMES);
          const form = new FormData();
          form.append('id', rng.pick(IDS));
          form.append('f', new Blob([new Uint8Array(files['adapter_config.json'])]), name);
          form.append('g', new Blob([new Uint8Array(files['adapter_model.safetensors'])]), rng.pick([...NAMES, 'adapter_model.safetensors']));
          const r = await fetch(`${t.url}/v1/deltas?replace=true`, { method: 'POST', body: form });
          status = r.status;
          body = await r.text();
        }
        if (status >= 500) {
          result.fiveXX++;
          result.failures.push(`${kind} → ${status}: ${body.slice(0, 200)}`);
        } else if (status >= 400) {
          const parsed = JSON.parse(body) as { error?: { message?: unknown } };
          if (typeof parsed.error?.message !== 'string' || parsed.error.message.length < 8) result.failures.push(`${kind} → ${status} without a message: ${body.slice(0, 200)}`);
          else result.refused++;
        } else result.accepted++;
      } catch (err) {
        result.failures.push(`${kind}: ${(err as Error).message}`);
      }
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  if ((await fetch(`${t.url}/healthz`).catch(() => null))?.status !== 200) result.crashes++;
  result.tempLeft = (await readdir(t.uploads)).length + (await readdir(t.stack.deltasDir)).filter((e) => e.startsWith('.')).length;
  return result;
}

// --- overload ------------------------------------------------------------------------

/** 2× capacity (max_batch + max_queue) at once: 429 with Retry-After for the excess, no 5xx, bounded memory, recovery at once. */
export async function overload(t: Target, rounds: number): Promise<CategoryResult> {
  const result = newResult('overload at 2× capacity');
  const capacity = t.stack.config.maxBatch + t.stack.config.maxQueue;
  const rss0 = rssMb();
  const health: number[] = [];
  for (let r = 0; r < rounds; r++) {
    const probe = probeHealth(t.url, 50, 1500);
    const answers = await Promise.all(Array.from({ length: 2 * capacity }, (_, i) =>
      fetch(`${t.url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ inputs: `overload ${i}`, parameters: { max_new_tokens: 24 } }) })
        .then(async (res) => ({ status: res.status, retry: res.headers.get('retry-after'), body: await res.text() }))));
    health.push(...(await probe));
    for (const a of answers) {
      result.cases++;
      if (a.status === 200) result.accepted++;
      else if (a.status === 429 && a.retry !== null && Number(a.retry) > 0) result.refused++;
      else {
        if (a.status >= 500) result.fiveXX++;
        result.failures.push(`overload → ${a.status} (Retry-After ${a.retry}): ${a.body.slice(0, 120)}`);
      }
    }
    if (result.refused === 0 && r === rounds - 1) result.failures.push('no request was refused with 429: the overload did not overload');
    // Recovery: the next request is served at once.
    const t0 = performance.now();
    const after = await fetch(`${t.url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ inputs: 'after', parameters: { max_new_tokens: 1 } }) });
    await after.text();
    result.figures.recoveryMs = Math.max(result.figures.recoveryMs ?? 0, performance.now() - t0);
    if (after.status !== 200) result.failures.push(`after the overload → ${after.status}`);
  }
  result.figures.healthP99Ms = percentile(health, 99);
  result.figures.rssGrowthMb = rssMb() - rss0;
  return result;
}

// --- slow clients ------------------------------------------------------------------------

/** A stream reader that never reads must not stall others; slow-loris connections are closed by the request timeout. */
export async function slowClients(t: Target, loris: number): Promise<CategoryResult> {
  const result = newResult('slow clients');
  const { port } = new URL(t.url);
  // 1. Streams whose readers never read, while normal requests run beside them.
  const stuck = Array.from({ length: 4 }, () => {
    const s = connect(Number(port), '127.0.0.1');
    const body = JSON.stringify({ inputs: 'never read me', parameters: { max_new_tokens: 200 }, stream: true });
    s.write(`POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
    s.pause();
    s.on('error', () => {});
    return s;
  });
  const rss0 = rssMb();
  const t0 = performance.now();
  const normal = await Promise.all(Array.from({ length: 8 }, (_, i) => withTimeout(
    fetch(`${t.url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ inputs: `beside ${i}`, parameters: { max_new_tokens: 16 } }) })
      .then((r) => r.status), 60_000).catch(() => 0)));
  result.figures.besideStuckMs = performance.now() - t0;
  for (const s of normal) {
    result.cases++;
    if (s === 200) result.accepted++;
    else result.failures.push(`a request beside never-reading streams → ${s || 'no answer'}`);
  }
  result.figures.rssGrowthMb = rssMb() - rss0;
  for (const s of stuck) s.destroy();

  // 2. Slow-loris: headers one byte at a time; the server must close them after its request timeout (3 s here).
  const started = performance.now();
  const closedAt = await Promise.all(Array.from({ length: loris }, () => new Promise<number>((resolve) => {
    const s = connect(Number(port), '127.0.0.1');
    const head = 'POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Slow: ';
    let i = 0;
    const timer = setInterval(() => {
      if (!s.destroyed) s.write(head[i++ % head.length]);
    }, 200);
    const done = () => {
      clearInterval(timer);
      resolve(performance.now() - started);
    };
    s.on('close', done);
    s.on('error', () => {});
    setTimeout(() => s.destroy(), 20_000);
  })));
  for (const ms of closedAt) {
    result.cases++;
    if (ms < 10_000) result.refused++;
    else result.failures.push(`a slow-loris connection was still open after ${(ms / 1000).toFixed(1)} s`);
  }
  result.figures.lorisClosedMaxMs = Math.max(...closedAt);
  if ((await fetch(`${t.url}/healthz`).catch(() => null))?.status !== 200) result.crashes++;
  return result;
}

// --- faults behind the server's back ----------------------------------------------------

export async function faults(t: Target): Promise<CategoryResult> {
  const result = newResult('faults (files corrupted or deleted)');
  const info = t.stack.services.backbone.info;
  const gen = (task: string | null) => fetch(`${t.url}/v1/generate`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ ...(task ? { task } : {}), inputs: 'fault', parameters: { max_new_tokens: 2 } }),
  });
  for (let i = 0; i < 3; i++) {
    // Corrupted behind the server: the delta's requests get a clear error naming the corruption; others are untouched.
    const id = `corrupt-${i}`;
    await uploadDelta(t.url, id, peftLora(info, 10 + i, { bScale: 0.05 }));
    await writeFile(join(t.stack.deltasDir, id, 'adapter_model.safetensors'), 'garbage');
    t.stack.services.registry.cache.invalidate(id);
    const bad = await gen(id);
    const body = await bad.text();
    result.cases++;
    if (/corrupt/.test(body)) result.refused++;
    else result.failures.push(`corrupted delta → ${bad.status}: ${body.slice(0, 150)}`);
    const ok = await gen(null);
    await ok.text();
    result.cases++;
    if (ok.status === 200) result.accepted++;
    else result.failures.push(`the backbone beside a corrupted delta → ${ok.status}`);
    // Deleted behind the server: 404 on the next request.
    await rm(join(t.stack.deltasDir, id), { recursive: true, force: true });
    const gone = await gen(id);
    await gone.text();
    result.cases++;
    if (gone.status === 404) result.refused++;
    else result.failures.push(`a delta deleted behind the server → ${gone.status}`);
    // A foreign file appears: listings still answer.
    await writeFile(join(t.stack.deltasDir, `NOTES-${i}.md`), 'not a delta');
    const list = await fetch(`${t.url}/v1/deltas`);
    await list.text();
    result.cases++;
    if (list.status === 200) result.accepted++;
    else result.failures.push(`GET /v1/deltas with a stray file → ${list.status}`);
  }
  if ((await fetch(`${t.url}/healthz`).catch(() => null))?.status !== 200) result.crashes++;
  return result;
}

// --- an engine step that throws ----------------------------------------------------------------

interface Answer {
  status: number;
  /** The generated text, or the error's code (a status's body, or a stream's error event). */
  text: string | null;
  code: string | null;
}

/** One greedy generation, streamed or not, reduced to its text or its error code. */
async function generateOnce(url: string, body: Record<string, unknown>, onFirstToken?: () => void): Promise<Answer> {
  const r = await fetch(`${url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  if (!body.stream || r.status !== 200) {
    const j = (await r.json()) as { generated_text?: string; error?: { code?: string } };
    return { status: r.status, text: j.generated_text ?? null, code: j.error?.code ?? null };
  }
  // A stream's status is 200 from its first token on; a failure after that is its last event.
  const reader = r.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  let first = true;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    if (first && buf.includes('data:')) {
      first = false;
      onFirstToken?.();
    }
  }
  const events = buf.split('\n\n').filter((e) => e.startsWith('data: ')).map((e) => JSON.parse(e.slice(6)) as { generated_text?: string | null; error?: { code?: string } });
  const last = events.at(-1);
  return { status: 200, text: last?.generated_text ?? null, code: last?.error?.code ?? null };
}

async function metricValue(url: string, name: string): Promise<number> {
  const text = await (await fetch(`${url}/metrics`)).text();
  const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text);
  return m ? Number(m[1]) : 0;
}

/**
 * An engine step that throws, for real: the server runs with DELTASERVE_FAULTS=engine-step, and its
 * hook makes onnxruntime reject the engine's next run of a phase. Each round, four long streams are
 * decoding when the fault is armed; then either
 *  - prefill: four short requests arrive, and the run prefilling them fails: they get a 500 engine_error,
 *    the streams decoding beside them finish untouched; or
 *  - decode: the decode run fails: the four streams end with an engine_error event, and the short
 *    requests sent after are served.
 * Exactly the failed run's rows fail, the metrics count them, and every request answered 200 — during
 * the round and after it — has the text it had before any fault (the KV cache and delta banks are whole).
 */
export async function engineStepFaults(t: Target, rounds: number): Promise<CategoryResult> {
  const result = newResult('faults (an engine step that throws)');
  const info = t.stack.services.backbone.info;
  await uploadDelta(t.url, 'fault-a', peftLora(info, 41, { bScale: 0.05 }));
  const long = (i: number) => ({ task: i % 2 ? 'fault-a' : null, inputs: `long fault ${i}`, parameters: { max_new_tokens: 40 }, stream: true });
  const short = (i: number) => ({ task: i % 2 ? null : 'fault-a', inputs: `short fault ${i}`, parameters: { max_new_tokens: 6 }, stream: i >= 2 });
  const bodies = [...[0, 1, 2, 3].map(long), ...[0, 1, 2, 3].map(short)];
  const baseline = await Promise.all(bodies.map((b) => generateOnce(t.url, b)));
  for (const b of baseline) if (b.status !== 200 || b.text === null) throw new Error(`the engine-fault baseline failed: ${JSON.stringify(b)}`);
  const check = (a: Answer, i: number, mayFail: boolean, when: string) => {
    result.cases++;
    if (a.status === 200 && a.code === null && a.text === baseline[i].text) result.accepted++;
    // A stream that started has sent its 200: its failure is its last event.
    else if (mayFail && a.code === 'engine_error' && (a.status === 500 || bodies[i].stream)) result.injected5xx++;
    else {
      if (a.status >= 500) result.fiveXX++;
      result.failures.push(`${when}: request ${i} → ${a.status} ${a.code ?? ''} ${a.text === baseline[i].text ? '' : `text ${JSON.stringify(a.text)} ≠ ${JSON.stringify(baseline[i].text)}`}`);
    }
  };
  const arm = async (phase: 'prefill' | 'decode') => {
    const r = await fetch(`${t.url}/v1/faults/engine-step`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ runs: 1, phase }) });
    if (r.status !== 202) throw new Error(`arming the engine fault → ${r.status}: ${await r.text()}`);
  };
  for (let r = 0; r < rounds; r++) {
    const phase = r % 2 === 0 ? 'prefill' : 'decode';
    const when = `round ${r} (${phase} fails)`;
    const rows0 = await metricValue(t.url, 'deltaserve_engine_failed_requests_total');
    const injected0 = result.injected5xx;
    let decoding = 0;
    let allDecoding!: () => void;
    const started = new Promise<void>((res) => (allDecoding = res));
    const longs = Promise.all(bodies.slice(0, 4).map((b) => generateOnce(t.url, b, () => ++decoding === 4 && allDecoding())));
    await withTimeout(started, 60_000);
    await arm(phase);
    let answers: Answer[];
    if (phase === 'prefill') answers = await withTimeout(Promise.all([longs, Promise.all(bodies.slice(4).map((b) => generateOnce(t.url, b)))]).then(([l, s]) => [...l, ...s]), 60_000);
    else {
      const l = await withTimeout(longs, 60_000);
      answers = [...l, ...(await withTimeout(Promise.all(bodies.slice(4).map((b) => generateOnce(t.url, b))), 60_000))];
    }
    // Who may fail: the shorts' prefill, or the longs' decode; never the others.
    answers.forEach((a, i) => check(a, i, phase === 'prefill' ? i >= 4 : i < 4, when));
    const failedRows = (await metricValue(t.url, 'deltaserve_engine_failed_requests_total')) - rows0;
    const injected = result.injected5xx - injected0;
    if (injected === 0) result.failures.push(`${when}: the armed fault failed no request`);
    if (phase === 'decode' && injected !== 4) result.failures.push(`${when}: ${injected} of the 4 decoding streams failed`);
    if (failedRows !== injected) result.failures.push(`${when}: deltaserve_engine_failed_requests_total rose by ${failedRows}, ${injected} requests got engine_error`);
    // The engine goes on: the same requests again give the same texts.
    const after = await withTimeout(Promise.all(bodies.map((b) => generateOnce(t.url, b))), 60_000);
    after.forEach((a, i) => check(a, i, false, `after ${when}`));
  }
  if ((await fetch(`${t.url}/healthz`).catch(() => null))?.status !== 200) result.crashes++;
  return result;
}

/** SIGKILL of a real server process during registration, replace and generation bursts; after each restart the store is whole and no temp is left. */
export async function sigkills(dir: string, rounds: number, info: BackboneInfo): Promise<CategoryResult> {
  const result = newResult('SIGKILL during writes and generation');
  const deltas = join(dir, 'kill-deltas');
  const uploads = join(dir, 'kill-uploads');
  await mkdir(uploads, { recursive: true });
  const env = { DELTASERVE_MODEL: 'demo:gpt2', DELTASERVE_DELTAS_DIR: deltas, DELTASERVE_UPLOAD_TMP_DIR: uploads, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'warn' };
  const files = peftLora(info, 5, { bScale: 0.05 });
  for (let r = 0; r <= rounds; r++) {
    const child = spawnInRepo('node', ['--import', 'tsx', 'src/cli.ts', 'serve'], { ...env, LOG_LEVEL: 'info' });
    let url: string;
    try {
      url = await withTimeout(child.listening, 180_000);
      for (let i = 0; i < 600 && (await fetch(`${url}/readyz`).then((x) => x.status).catch(() => 0)) !== 200; i++) await new Promise((res) => setTimeout(res, 200));
    } catch (err) {
      result.crashes++;
      result.failures.push(`restart ${r}: ${(err as Error).message.slice(0, 200)}`);
      await child.kill();
      break;
    }
    // After a kill: every listed delta is whole (reads, loads, generates) and nothing half-written is left.
    const listed = ((await (await fetch(`${url}/v1/deltas`)).json()) as { data: { id: string }[] }).data;
    for (const { id } of listed) {
      const g = await fetch(`${url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ task: id, inputs: 'x', parameters: { max_new_tokens: 1 } }) });
      await g.text();
      result.cases++;
      if (g.status === 200) result.accepted++;
      else {
        result.dataLost++;
        result.failures.push(`after SIGKILL ${r}: delta ${id} → ${g.status}`);
      }
    }
    result.tempLeft += (await readdir(uploads)).length + (await readdir(deltas).catch(() => [])).filter((e) => e.startsWith('.')).length;
    if (r === rounds) {
      await child.kill();
      break;
    }
    // One delta registered whole, then a burst of registrations, replaces and generations, killed in the middle.
    const base = await uploadDelta(url, `kill-base-${r}`, files);
    await base.text();
    result.cases++;
    if (base.status === 201) result.accepted++;
    else result.failures.push(`registering before SIGKILL ${r} → ${base.status}`);
    const burst = Array.from({ length: 12 }, (_, i) => i % 3 === 2
      ? fetch(`${url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ inputs: 'burst', parameters: { max_new_tokens: 64 } }) }).then((x) => x.text())
      : uploadDelta(url, `kill-${i % 4}`, files, {}).then((x) => x.text()).catch(() => ''));
    const bursting = Promise.allSettled(burst);
    await new Promise((res) => setTimeout(res, 150 + 100 * r));
    child.signal('SIGKILL');
    await child.exited;
    await bursting;
  }
  return result;
}

// --- soak -------------------------------------------------------------------------------------

/** Mixed traffic (every generation route, streams, two deltas, registrations and deletions) for `minutes`; RSS sampled throughout. */
export async function soak(t: Target, minutes: number): Promise<CategoryResult> {
  const result = newResult(`soak (${minutes} min mixed traffic)`);
  const info = t.stack.services.backbone.info;
  for (const id of ['soak-a', 'soak-b']) await uploadDelta(t.url, id, peftLora(info, id === 'soak-a' ? 21 : 22, { bScale: 0.05 }));
  const end = Date.now() + minutes * 60_000;
  const samples: { at: number; rss: number }[] = [];
  const sampler = setInterval(() => samples.push({ at: Date.now(), rss: rssMb() }), 1000);
  const json = { 'content-type': 'application/json' };
  const bodies: [string, () => unknown][] = [
    ['/v1/generate', () => ({ task: 'soak-a', inputs: 'soak', parameters: { max_new_tokens: 8 } })],
    ['/v1/generate', () => ({ inputs: 'soak stream', parameters: { max_new_tokens: 8 }, stream: true })],
    ['/generate_stream', () => ({ inputs: 'soak', parameters: { max_new_tokens: 8, adapter_id: 'soak-b' } })],
    ['/v1/completions', () => ({ model: 'soak-b', prompt: 'soak', max_tokens: 8, logprobs: 2 })],
    ['/v1/chat/completions', () => ({ model: 'soak-a', messages: [{ role: 'user', content: 'soak' }], max_tokens: 8, stream: true })],
    ['/generate', () => ({ inputs: 'soak', parameters: { max_new_tokens: 8 } })],
  ];
  let churn = 0;
  const client = async (k: number) => {
    let i = k;
    while (Date.now() < end) {
      i++;
      result.cases++;
      try {
        let status: number;
        if (k === 0 && i % 10 === 0) {
          // Registrations and deletions of a churning delta, beside the traffic.
          const id = `churn-${churn++ % 3}`;
          const r = i % 20 === 0 ? await fetch(`${t.url}/v1/deltas/${id}`, { method: 'DELETE' }) : await uploadDelta(t.url, id, peftLora(info, 30 + (churn % 5), { bScale: 0.05 }), {});
          await r.text();
          status = r.status === 404 || r.status === 409 ? 200 : r.status;
        } else {
          const [path, body] = bodies[i % bodies.length];
          const r = await fetch(`${t.url}${path}`, { method: 'POST', headers: json, body: JSON.stringify(body()) });
          await r.text();
          status = r.status;
        }
        if (status < 300) result.accepted++;
        else if (status < 500) result.refused++;
        else {
          result.fiveXX++;
          result.failures.push(`soak → ${status}`);
        }
      } catch (err) {
        result.failures.push(`soak: ${(err as Error).message}`);
      }
    }
  };
  const probeWindow = Math.min(10_000, minutes * 60_000 / 2);
  const probe = (async () => {
    await new Promise((r) => setTimeout(r, minutes * 60_000 / 2 - probeWindow / 2));
    return probeHealth(t.url, 200, probeWindow);
  })();
  await Promise.all(Array.from({ length: 8 }, (_, k) => client(k)));
  clearInterval(sampler);
  const health = await probe;
  // Warm-up: the first quarter. Growth: the last quarter's median RSS over the second quarter's.
  const q = Math.max(1, Math.floor(samples.length / 4));
  const median = (xs: number[]) => percentile(xs, 50);
  const warm = median(samples.slice(q, 2 * q).map((s) => s.rss));
  const last = median(samples.slice(-q).map((s) => s.rss));
  result.figures.rssWarmMb = warm;
  result.figures.rssEndMb = last;
  result.figures.rssGrowthPct = ((last - warm) / warm) * 100;
  result.figures.healthP99Ms = percentile(health, 99);
  result.figures.healthProbes = health.length;
  result.tempLeft = (await readdir(t.uploads)).length + (await readdir(t.stack.deltasDir)).filter((e) => e.startsWith('.')).length;
  if ((await fetch(`${t.url}/healthz`).catch(() => null))?.status !== 200) result.crashes++;
  return result;
}
