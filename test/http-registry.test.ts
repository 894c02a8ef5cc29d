/**
 * The HTTP delta admin over the REAL registry (src/deltas/registry.ts) and the
 * demo:gpt2-small backbone's module list: the PEFT fixture trained on GPT-2,
 * uploaded as multipart, is validated and stored; a pickle is refused with
 * the registry's 422. No engine runs here.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import request from 'supertest';
import { loadBackbone } from '../src/backbone/backbone.js';
import { loadConfig } from '../src/config.js';
import { Registry } from '../src/deltas/registry.js';
import { createApp } from '../src/http/app.js';
import { createChatTemplate } from '../src/http/chat-template.js';
import { Lifecycle } from '../src/http/lifecycle.js';
import { createLogger } from '../src/log.js';
import { Metrics } from '../src/metrics.js';
import { EchoGenerator, MemoryRegistry } from './helpers/http-fakes.js';

const FIXTURE = fileURLToPath(new URL('../../shared/fixtures/peft-gpt2-lora-causal/', import.meta.url));

test('real registry: upload the PEFT GPT-2 fixture, inspect it, refuse a pickle, delete', {
  skip: existsSync(FIXTURE) ? false : `no fixture at ${FIXTURE} (a fresh clone has no ../shared)`,
  timeout: 120_000,
}, async () => {
  const scratch = await mkdtemp(join(tmpdir(), 'ds-http-registry-'));
  const backbone = await loadBackbone({ model: 'demo:gpt2-small', cacheDir: join(scratch, 'models') });
  const registry = await Registry.open({ dir: join(scratch, 'deltas'), backbone: backbone.info, cacheBytes: 2 ** 30 });
  const app = createApp({
    // The generator is not under test here; the echo stand-in only satisfies the interface.
    generator: new EchoGenerator(new MemoryRegistry()),
    registry,
    backbone: backbone.info,
    metrics: new Metrics({ defaultMetrics: false }),
    config: loadConfig({}),
    readiness: new Lifecycle(),
    chatTemplate: createChatTemplate(),
    logger: createLogger('silent'),
  });

  const config = await readFile(join(FIXTURE, 'adapter_config.json'));
  const weights = await readFile(join(FIXTURE, 'adapter_model.safetensors'));
  const res = await request(app).post('/v1/deltas').field('id', 'gpt2-lora')
    .attach('a', config, 'adapter_config.json').attach('b', weights, 'adapter_model.safetensors');
  assert.equal(res.status, 201, JSON.stringify(res.body));
  assert.equal(res.body.type, 'lora');
  assert.equal(res.body.format, 'peft');
  assert.equal(res.body.rank, 8);
  assert.ok(res.body.sites > 0);
  assert.match(res.body.sha256, /^[0-9a-f]{64}$/);

  const one = await request(app).get('/v1/deltas/gpt2-lora').expect(200);
  assert.equal(one.body.sites.length, res.body.sites);
  assert.ok(one.body.sites.some((s: { module: string }) => s.module === 'transformer.h.0.attn.c_attn'));
  const models = await request(app).get('/v1/models').expect(200);
  assert.deepEqual(models.body.data.map((m: { id: string }) => m.id), ['demo:gpt2-small', 'gpt2-lora']);

  const pickle = await request(app).post('/v1/deltas').field('id', 'pickled')
    .attach('a', config, 'adapter_config.json').attach('b', Buffer.from('not really a pickle'), 'adapter_model.bin');
  assert.equal(pickle.status, 422, JSON.stringify(pickle.body));
  assert.match(JSON.stringify(pickle.body.error), /safetensors/);

  await request(app).delete('/v1/deltas/gpt2-lora').expect(204);
  assert.equal((await request(app).get('/v1/deltas/gpt2-lora')).status, 404);
});
