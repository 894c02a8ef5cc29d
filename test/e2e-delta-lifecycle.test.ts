/**
 * One running server (serve() on 127.0.0.1 over the REAL stack): register a
 * delta by multipart upload → generate with it → replace it with different
 * weights → generate → delete → 404. Every greedy output equals what the
 * in-process Engine gives for the same delta, loaded directly from the same
 * files without HTTP; outputs with and without the delta differ. A request
 * running while its delta is replaced or deleted finishes on the version it
 * started with.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import request from 'supertest';
import type { LoadedDelta } from '../src/deltas/types.js';
import { serve, type RunningServer } from '../src/http/server.js';
import { createLogger } from '../src/log.js';
import { engineGreedy, loadDeltaDirectly, openStream, peftLora, sseData, startStack, type Stack } from './helpers/e2e-stack.js';

const PROMPT = 'In the beginning';
const N = 24;

describe('e2e: register → generate → replace → generate → delete on one running server', () => {
  let stack: Stack;
  let running: RunningServer;
  let url: string;

  before(async () => {
    stack = await startStack();
    running = await serve(stack.services.app, { host: '127.0.0.1', port: 0, drainSeconds: 5 }, {
      lifecycle: stack.services.lifecycle, logger: createLogger('silent'), signals: [], exit: () => {},
    });
    url = running.url;
  });
  after(async () => {
    await running?.shutdown();
    await stack?.close();
  });

  const upload = (id: string, files: Record<string, Buffer>, query = '') => {
    let req = request(url).post(`/v1/deltas${query}`).field('id', id);
    for (const [name, content] of Object.entries(files)) req = req.attach('files', content, name);
    return req;
  };

  const generate = async (task: string | null, maxNewTokens = N) => {
    const r = await request(url).post('/v1/generate').send({ task, inputs: PROMPT, parameters: { max_new_tokens: maxNewTokens } });
    return r;
  };

  /** The token ids, through the SSE stream, to compare with the engine's ids as well as text. */
  const streamIds = async (task: string | null) => {
    const s = openStream(`${url}/v1/generate`, { task, inputs: PROMPT, parameters: { max_new_tokens: N }, stream: true });
    assert.equal(await s.status, 200);
    const events = sseData(await s.done).map((d) => JSON.parse(d));
    return { ids: events.map((e) => e.token.id as number), text: events.at(-1).generated_text as string };
  };

  test('the whole lifecycle, each output equal to the in-process Engine\'s', async () => {
    const backbone = stack.services.backbone;
    const v1Files = peftLora(backbone.info, 21);
    const v2Files = peftLora(backbone.info, 22);
    const v1: LoadedDelta = await loadDeltaDirectly(backbone, 'life', v1Files);
    const v2: LoadedDelta = await loadDeltaDirectly(backbone, 'life', v2Files);
    const ref = {
      bare: await engineGreedy(backbone, null, PROMPT, N),
      v1: await engineGreedy(backbone, v1, PROMPT, N),
      v2: await engineGreedy(backbone, v2, PROMPT, N),
    };
    assert.notEqual(ref.v1.text, ref.bare.text, 'the reference itself: the delta changes the output');
    assert.notEqual(ref.v2.text, ref.v1.text, 'the reference itself: the replacement changes the output');

    const bare = await generate(null);
    assert.equal(bare.status, 200);
    assert.equal(bare.body.generated_text, ref.bare.text);

    const before = await generate('life');
    assert.equal(before.status, 404, 'not registered yet');

    const created = await upload('life', v1Files);
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const r1 = await generate('life');
    assert.equal(r1.status, 200);
    assert.equal(r1.body.generated_text, ref.v1.text, 'v1 over HTTP = v1 in the engine');
    assert.notEqual(r1.body.generated_text, bare.body.generated_text, 'with and without the delta differ');
    assert.deepEqual(await streamIds('life'), ref.v1, 'token for token');

    const conflict = await upload('life', v2Files);
    assert.equal(conflict.status, 409);
    const replaced = await upload('life', v2Files, '?replace=true');
    assert.equal(replaced.status, 201, JSON.stringify(replaced.body));
    assert.notEqual(replaced.body.sha256, created.body.sha256);
    const r2 = await generate('life');
    assert.equal(r2.status, 200);
    assert.equal(r2.body.generated_text, ref.v2.text, 'v2 over HTTP = v2 in the engine');
    assert.notEqual(r2.body.generated_text, r1.body.generated_text);
    assert.deepEqual(await streamIds('life'), ref.v2);

    await request(url).delete('/v1/deltas/life').expect(204);
    const after = await generate('life');
    assert.equal(after.status, 404);
    assert.equal(after.body.error.code, 'task_not_found');
    assert.equal((await request(url).get('/v1/deltas/life')).status, 404);
    assert.equal((await generate(null)).body.generated_text, ref.bare.text, 'the bare backbone is untouched');
  });

  test('a request running while its delta is replaced, then deleted, finishes on the version it started with', async () => {
    const backbone = stack.services.backbone;
    const v1Files = peftLora(backbone.info, 31);
    const v2Files = peftLora(backbone.info, 32);
    const long = 600;
    const refV1 = await engineGreedy(backbone, await loadDeltaDirectly(backbone, 'swap', v1Files), PROMPT, long);
    const refV2 = await engineGreedy(backbone, await loadDeltaDirectly(backbone, 'swap', v2Files), PROMPT, N);
    await upload('swap', v1Files).expect(201);

    let ended = 0;
    const s = openStream(`${url}/v1/generate`, { task: 'swap', inputs: PROMPT, parameters: { max_new_tokens: long }, stream: true });
    const done = s.done.then((b) => {
      ended = performance.now();
      return b;
    });
    await s.firstEvent;
    await upload('swap', v2Files, '?replace=true').expect(201);
    const during = await generate('swap');
    const replacedAt = performance.now();
    assert.equal(during.body.generated_text, refV2.text, 'a new request gets the new version at once');
    await request(url).delete('/v1/deltas/swap').expect(204);
    assert.equal((await generate('swap')).status, 404, 'new requests after the delete get 404');
    const deletedAt = performance.now();

    const events = sseData(await done).map((d) => JSON.parse(d));
    assert.ok(ended > deletedAt && deletedAt > replacedAt, 'the stream was still running through the replace and the delete');
    assert.equal(events.at(-1).generated_text, refV1.text, 'the running request finished on v1');
    assert.equal(events.at(-1).details.generated_tokens, refV1.ids.length);
  });
});
