/**
 * End to end on the REAL stack (demo:gpt2 backbone, real registry, engine
 * worker, scheduler): every endpoint of the contract, its success and each
 * error it can give, asserted on status and body shape; the SSE framing of
 * /v1/generate. supertest against services.app, plus a listening server where
 * a request must stay open while another is made.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import request from 'supertest';
import { openStream, peftLora, sseData, startStack, waitFor, listenOn, type Stack } from './helpers/e2e-stack.js';

const native = (body: unknown, code: string) => {
  const e = (body as { error?: { code?: unknown; message?: unknown } }).error;
  assert.ok(e, `expected {"error":{...}}, got ${JSON.stringify(body)}`);
  assert.equal(e.code, code, JSON.stringify(body));
  assert.equal(typeof e.message, 'string');
  assert.ok((e.message as string).length > 10, 'the message says what and how to fix');
  assert.doesNotMatch(JSON.stringify(body), /\n\s+at |node_modules|\.ts:\d+/, 'no stack trace');
};

const openai = (body: unknown, code: string, type: string) => {
  const e = (body as { error?: { code?: unknown; message?: unknown; type?: unknown } }).error;
  assert.ok(e, `expected {"error":{...}}, got ${JSON.stringify(body)}`);
  assert.equal(e.code, code, JSON.stringify(body));
  assert.equal(e.type, type, JSON.stringify(body));
  assert.equal(typeof e.message, 'string');
  assert.doesNotMatch(JSON.stringify(body), /\n\s+at |node_modules|\.ts:\d+/, 'no stack trace');
};

function upload(app: Stack['services']['app'], id: string, files: Record<string, Buffer>, query = '') {
  let req = request(app).post(`/v1/deltas${query}`).field('id', id);
  Object.entries(files).forEach(([name, content], i) => (req = req.attach(`file${i}`, content, name)));
  return req;
}

describe('e2e: the contract on the real stack', () => {
  let stack: Stack;
  let app: Stack['services']['app'];
  let longPrompt: string;

  before(async () => {
    stack = await startStack({ env: { DELTASERVE_MAX_BODY_BYTES: '64KiB', DELTASERVE_MAX_UPLOAD_BYTES: '1MiB' } });
    app = stack.services.app;
    longPrompt = 'lorem ipsum dolor sit amet '.repeat(60);
    while (stack.services.scheduler.countTokens(longPrompt) <= stack.services.backbone.info.maxPositions) longPrompt += longPrompt;
    assert.ok(Buffer.byteLength(JSON.stringify({ inputs: longPrompt })) < 64 * 1024, 'the long prompt must fit the body limit');
  });
  after(() => stack?.close());

  test('probes and GET /v1/backbone', async () => {
    assert.deepEqual((await request(app).get('/healthz').expect(200)).body, { status: 'ok' });
    assert.equal((await request(app).get('/readyz')).status, 200);
    const b = (await request(app).get('/v1/backbone').expect(200)).body;
    assert.equal(b.name, 'demo:gpt2');
    assert.equal(b.family, 'gpt2');
    assert.equal(typeof b.fingerprint, 'string');
    assert.ok(b.fingerprint.length > 0);
    assert.equal(b.modules.filter((m: { name: string }) => m.name.startsWith('transformer.h.')).length, 4 * 4, 'four linears in each of four layers');
    assert.ok(b.modules.some((m: { name: string }) => m.name === 'lm_head'));
    const cAttn = b.modules.find((m: { name: string }) => m.name === 'transformer.h.0.attn.c_attn');
    assert.deepEqual(cAttn, { name: 'transformer.h.0.attn.c_attn', kind: 'linear', in_features: 128, out_features: 384 });
    for (const m of b.modules) assert.deepEqual(Object.keys(m).sort(), ['in_features', 'kind', 'name', 'out_features']);
    assert.equal(typeof b.default_targets, 'object');
    assert.deepEqual(b.default_targets.lora, ['c_attn']);
  });

  test('POST /v1/generate: 200 with the contract shape; the backbone name and no task run the same bare backbone', async () => {
    const body = { inputs: 'The quick brown fox', parameters: { max_new_tokens: 12 } };
    const a = (await request(app).post('/v1/generate').send(body).expect(200)).body;
    assert.deepEqual(Object.keys(a).sort(), ['details', 'generated_text', 'task']);
    assert.equal(a.task, null);
    assert.equal(typeof a.generated_text, 'string');
    assert.ok(['length', 'eos_token', 'stop_sequence'].includes(a.details.finish_reason));
    assert.ok(a.details.generated_tokens >= 1 && a.details.generated_tokens <= 12);
    assert.equal(a.details.prompt_tokens, stack.services.scheduler.countTokens(body.inputs));
    const named = (await request(app).post('/v1/generate').send({ ...body, task: 'demo:gpt2' }).expect(200)).body;
    assert.equal(named.generated_text, a.generated_text, 'greedy bare output is the same by either name');
    assert.equal(named.task, null);
  });

  test('POST /v1/generate: stop sequences end with stop_sequence', async () => {
    const free = (await request(app).post('/v1/generate').send({ inputs: 'abc', parameters: { max_new_tokens: 20 } }).expect(200)).body;
    const stop = free.generated_text.slice(3, 5);
    if (stop.length < 2) return; // too short an output to cut (the demo backbone hit EOS)
    const cut = (await request(app).post('/v1/generate').send({ inputs: 'abc', parameters: { max_new_tokens: 20, stop: [stop] } }).expect(200)).body;
    assert.equal(cut.details.finish_reason, 'stop_sequence');
    assert.ok(free.generated_text.startsWith(cut.generated_text));
    assert.ok(!cut.generated_text.includes(stop) || cut.generated_text.indexOf(stop) === cut.generated_text.length - stop.length);
  });

  test('POST /v1/generate: 400 malformed, 404 unknown task, 413 too large, 422 prompt_too_long', async () => {
    const bad = [
      request(app).post('/v1/generate').set('content-type', 'application/json').send('{"inputs": '),
      request(app).post('/v1/generate').send({ parameters: {} }),
      request(app).post('/v1/generate').send({ inputs: 'x', task: 'no spaces allowed' }),
      request(app).post('/v1/generate').send({ inputs: 'x', parameters: { top_p: 2 } }),
      request(app).post('/v1/generate').send({ inputs: 'x', parameters: { max_new_tokens: 0 } }),
      request(app).post('/v1/generate').send({ inputs: 'x', stream: 'yes' }),
    ];
    for (const r of await Promise.all(bad)) {
      assert.equal(r.status, 400, JSON.stringify(r.body));
      native(r.body, 'bad_request');
    }
    const missing = await request(app).post('/v1/generate').send({ inputs: 'x', task: 'no-such-task' });
    assert.equal(missing.status, 404);
    native(missing.body, 'task_not_found');
    const missingStream = await request(app).post('/v1/generate').send({ inputs: 'x', task: 'no-such-task', stream: true });
    assert.equal(missingStream.status, 404, 'a stream that cannot start is still a proper status');
    native(missingStream.body, 'task_not_found');

    const big = await request(app).post('/v1/generate').send({ inputs: 'x'.repeat(70 * 1024) });
    assert.equal(big.status, 413);
    native(big.body, 'payload_too_large');

    const long = await request(app).post('/v1/generate').send({ inputs: longPrompt, parameters: { max_new_tokens: 4 } });
    assert.equal(long.status, 422);
    native(long.body, 'prompt_too_long');
    assert.match(long.body.error.message, /1024/);
  });

  test('unknown routes are a JSON 404', async () => {
    const r = await request(app).get('/v1/nothing-here');
    assert.equal(r.status, 404);
    native(r.body, 'not_found');
  });

  test('SSE: one event per token, as many as details.generated_tokens; the last carries the concatenation', async () => {
    const r = await request(app).post('/v1/generate')
      .send({ inputs: 'Once upon a time', parameters: { max_new_tokens: 40 }, stream: true })
      .buffer(true).parse((res, cb) => {
        let s = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (s += c));
        res.on('end', () => cb(null, s));
      });
    assert.equal(r.status, 200);
    assert.match(r.headers['content-type'], /^text\/event-stream/);
    const events = sseData(r.body as string).map((d) => JSON.parse(d));
    const last = events.at(-1);
    assert.ok(last.details, 'the last event carries details');
    assert.equal(events.length, last.details.generated_tokens);
    for (const e of events.slice(0, -1)) {
      assert.deepEqual(Object.keys(e).sort(), ['generated_text', 'token']);
      assert.equal(e.generated_text, null);
      assert.equal(typeof e.token.id, 'number');
      assert.equal(typeof e.token.text, 'string');
    }
    assert.equal(typeof last.token.id, 'number');
    assert.equal(last.generated_text, events.map((e) => e.token.text).join(''));
    const plain = (await request(app).post('/v1/generate').send({ inputs: 'Once upon a time', parameters: { max_new_tokens: 40 } }).expect(200)).body;
    assert.equal(last.generated_text, plain.generated_text, 'streamed and plain greedy runs agree');
    assert.deepEqual(last.details, plain.details);
  });

  test('delta admin: upload 201, list, inspect, 409, 422 invalid leaves nothing, 400s, 413, delete 204 then 404', async () => {
    const info = stack.services.backbone.info;
    const files = peftLora(info, 1);
    const created = await upload(app, 'api-lora', files);
    assert.equal(created.status, 201, JSON.stringify(created.body));
    assert.deepEqual(Object.keys(created.body).sort(), ['bytes', 'format', 'id', 'rank', 'sha256', 'sites', 'type']);
    assert.equal(created.body.id, 'api-lora');
    assert.equal(created.body.type, 'lora');
    assert.equal(created.body.format, 'peft');
    assert.equal(created.body.rank, 8);
    assert.equal(created.body.sites, 4, 'c_attn in each of four layers');
    assert.match(created.body.sha256, /^[0-9a-f]{64}$/);
    assert.ok(created.body.bytes > 0);

    const list = (await request(app).get('/v1/deltas').expect(200)).body;
    const row = list.data.find((d: { id: string }) => d.id === 'api-lora');
    assert.deepEqual(Object.keys(row).sort(), ['bytes', 'cached', 'created_at', 'format', 'id', 'pinned', 'rank', 'type']);
    assert.equal(typeof row.cached, 'boolean');
    assert.ok(!Number.isNaN(Date.parse(row.created_at)));

    const one = (await request(app).get('/v1/deltas/api-lora').expect(200)).body;
    assert.equal(one.sites.length, 4);
    assert.deepEqual(Object.keys(one.sites[0]).sort(), ['kind', 'module', 'shapes', 'site']);
    assert.ok(one.sites.some((s: { module: string }) => s.module === 'transformer.h.3.attn.c_attn'));

    const models = (await request(app).get('/v1/models').expect(200)).body;
    assert.equal(models.object, 'list');
    assert.deepEqual(models.data.map((m: { id: string }) => m.id).sort(), ['api-lora', 'demo:gpt2']);
    assert.equal((await request(app).get('/v1/models/api-lora').expect(200)).body.id, 'api-lora');
    const noModel = await request(app).get('/v1/models/nope');
    assert.equal(noModel.status, 404);
    openai(noModel.body, 'model_not_found', 'not_found_error');

    // A registered delta serves at once, and differs from the bare backbone.
    const withIt = (await request(app).post('/v1/generate').send({ task: 'api-lora', inputs: 'Hello', parameters: { max_new_tokens: 16 } }).expect(200)).body;
    const bare = (await request(app).post('/v1/generate').send({ inputs: 'Hello', parameters: { max_new_tokens: 16 } }).expect(200)).body;
    assert.equal(withIt.task, 'api-lora');
    assert.notEqual(withIt.generated_text, bare.generated_text);

    const dup = await upload(app, 'api-lora', peftLora(info, 2));
    assert.equal(dup.status, 409);
    native(dup.body, 'delta_exists');

    // Shapes for another backbone: 422 naming each problem, and nothing stored.
    const wrong = peftLora({ ...info, modules: info.modules.map((m) => ({ ...m, inFeatures: m.inFeatures + 1 })) }, 3);
    const invalid = await upload(app, 'wrong-shape', wrong);
    assert.equal(invalid.status, 422, JSON.stringify(invalid.body));
    assert.ok(invalid.body.error.code, 'a code');
    assert.match(JSON.stringify(invalid.body.error), /shape|\[8, 129\]|129/);
    assert.equal((await request(app).get('/v1/deltas/wrong-shape')).status, 404, 'a refused delta leaves nothing behind');

    const pickle = await upload(app, 'pickled', { 'adapter_config.json': files['adapter_config.json'], 'adapter_model.bin': Buffer.from('\x80\x04pickle') });
    assert.equal(pickle.status, 422, JSON.stringify(pickle.body));
    assert.match(pickle.body.error.message + JSON.stringify(pickle.body.error.details ?? ''), /safetensors/i);

    for (const r of [
      await request(app).post('/v1/deltas').field('id', 'no-files'),
      await upload(app, 'bad id!', files),
      await upload(app, 'demo:gpt2', files),
      await request(app).post('/v1/deltas').send({ id: 'x' }),
      await upload(app, 'api-lora', files, '?replace=maybe'),
    ]) {
      assert.equal(r.status, 400, JSON.stringify(r.body));
      native(r.body, 'bad_request');
    }

    const huge = await upload(app, 'huge', { ...files, 'adapter_model.safetensors': Buffer.alloc(2 * 2 ** 20) });
    assert.equal(huge.status, 413);
    native(huge.body, 'payload_too_large');
    assert.equal((await request(app).get('/v1/deltas/huge')).status, 404);

    await request(app).delete('/v1/deltas/api-lora').expect(204);
    const gone = await request(app).get('/v1/deltas/api-lora');
    assert.equal(gone.status, 404);
    native(gone.body, 'delta_not_found');
    const again = await request(app).delete('/v1/deltas/api-lora');
    assert.equal(again.status, 404);
    native(again.body, 'delta_not_found');
    const run = await request(app).post('/v1/generate').send({ task: 'api-lora', inputs: 'Hello' });
    assert.equal(run.status, 404);
    native(run.body, 'task_not_found');
  });

  test('OpenAI routes: success shapes, and their errors in OpenAI\'s shape (400, 404, 422)', async () => {
    const c = (await request(app).post('/v1/completions').send({ model: 'demo:gpt2', prompt: 'Hi', max_tokens: 5, temperature: 0 }).expect(200)).body;
    assert.equal(c.object, 'text_completion');
    assert.match(c.id, /^cmpl-/);
    assert.equal(c.model, 'demo:gpt2');
    assert.equal(typeof c.choices[0].text, 'string');
    assert.ok(['length', 'stop'].includes(c.choices[0].finish_reason));
    assert.equal(c.usage.total_tokens, c.usage.prompt_tokens + c.usage.completion_tokens);
    assert.ok(c.usage.completion_tokens >= 1 && c.usage.completion_tokens <= 5);

    const chat = (await request(app).post('/v1/chat/completions')
      .send({ model: 'demo:gpt2', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 5, temperature: 0 }).expect(200)).body;
    assert.equal(chat.object, 'chat.completion');
    assert.equal(chat.choices[0].message.role, 'assistant');
    assert.equal(typeof chat.choices[0].message.content, 'string');
    assert.ok(chat.usage.prompt_tokens > 0);

    const checks: [request.Test, number, string, string][] = [
      [request(app).post('/v1/completions').send({ prompt: 'x' }), 400, 'bad_request', 'invalid_request_error'],
      [request(app).post('/v1/chat/completions').send({ model: 'demo:gpt2', messages: [] }), 400, 'bad_request', 'invalid_request_error'],
      [request(app).post('/v1/completions').send({ model: 'nope', prompt: 'x' }), 404, 'model_not_found', 'not_found_error'],
      [request(app).post('/v1/chat/completions').send({ model: 'nope', messages: [{ role: 'user', content: 'x' }], stream: true }), 404, 'model_not_found', 'not_found_error'],
      [request(app).post('/v1/completions').send({ model: 'demo:gpt2', prompt: 'x', n: 2 }), 422, 'invalid_request', 'invalid_request_error'],
      [request(app).post('/v1/completions').send({ model: 'demo:gpt2', prompt: longPrompt, max_tokens: 2 }), 422, 'prompt_too_long', 'invalid_request_error'],
      [request(app).post('/v1/chat/completions').send({ model: 'demo:gpt2', messages: [{ role: 'user', content: longPrompt }] }), 422, 'prompt_too_long', 'invalid_request_error'],
      [request(app).post('/v1/completions').send({ model: 'demo:gpt2', prompt: 'x'.repeat(70 * 1024) }), 413, 'payload_too_large', 'invalid_request_error'],
    ];
    for (const [req, status, code, type] of checks) {
      const r = await req;
      assert.equal(r.status, status, JSON.stringify(r.body));
      openai(r.body, code, type);
    }
  });
});

describe('e2e: 429 queue_full and 503 draining on the real stack', () => {
  let stack: Stack;
  before(async () => {
    stack = await startStack({ env: { DELTASERVE_MAX_BATCH: '1', DELTASERVE_MAX_QUEUE: '1' } });
  });
  after(() => stack?.close());

  test('one running, one waiting, the next is 429 queue_full with Retry-After; the waiting one still runs', async () => {
    const server = await listenOn(stack.services.app);
    try {
      const long = openStream(`${server.url}/v1/generate`, { inputs: 'a', parameters: { max_new_tokens: 1000 }, stream: true });
      await long.firstEvent;
      assert.equal(stack.services.scheduler.runningCount, 1);
      const waiting = fetch(`${server.url}/v1/generate`, {
        method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ inputs: 'b', parameters: { max_new_tokens: 3 } }),
      });
      await waitFor('the second request to queue', () => stack.services.scheduler.waiting === 1);
      for (const path of ['/v1/generate', '/v1/completions']) {
        const full = await request(stack.services.app).post(path).send({ inputs: 'c', model: 'demo:gpt2', prompt: 'c' });
        assert.equal(full.status, 429, JSON.stringify(full.body));
        assert.ok(Number(full.headers['retry-after']) >= 1, 'Retry-After in seconds');
        if (path === '/v1/generate') native(full.body, 'queue_full');
        else openai(full.body, 'queue_full', 'rate_limit_error');
      }
      long.abort();
      const second = await waiting;
      assert.equal(second.status, 200);
      assert.equal(((await second.json()) as { details: { generated_tokens: number } }).details.generated_tokens, 3);
    } finally {
      await server.close();
    }
  });

  test('draining: generation is 503 draining with Retry-After, /readyz 503, /healthz still 200', async () => {
    const app = stack.services.app;
    stack.services.lifecycle.startDraining();
    const r = await request(app).post('/v1/generate').send({ inputs: 'x' });
    assert.equal(r.status, 503);
    native(r.body, 'draining');
    assert.ok(Number(r.headers['retry-after']) >= 1);
    const o = await request(app).post('/v1/chat/completions').send({ model: 'demo:gpt2', messages: [{ role: 'user', content: 'x' }] });
    assert.equal(o.status, 503);
    openai(o.body, 'draining', 'server_error');
    const ready = await request(app).get('/readyz');
    assert.equal(ready.status, 503);
    assert.deepEqual(ready.body, { status: 'draining' });
    await request(app).get('/healthz').expect(200);
  });
});
