/**
 * The real-world fixture end to end: the PEFT LoRA someone trained on GPT-2
 * (../shared/fixtures/peft-gpt2-lora-causal, read in place) uploads over HTTP
 * onto the demo:gpt2-small backbone (GPT-2 small's shapes, with the fixture's
 * real GPT-2 tokenizer.json) and a generation with it returns 200. Skipped
 * when the fixture is absent (a fresh clone has no ../shared). Slow: the
 * 500 MB backbone is generated into a scratch cache first (see the timing
 * diagnostics).
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import request from 'supertest';
import { startStack } from './helpers/e2e-stack.js';

const FIXTURE = fileURLToPath(new URL('../../shared/fixtures/peft-gpt2-lora-causal/', import.meta.url));

test('the GPT-2 PEFT fixture uploads on demo:gpt2-small and generates', {
  skip: existsSync(join(FIXTURE, 'adapter_model.safetensors')) ? false : `no fixture at ${FIXTURE} (a fresh clone has no ../shared)`,
  timeout: 600_000,
}, async (t) => {
  const t0 = performance.now();
  const stack = await startStack({
    env: { DELTASERVE_MODEL: 'demo:gpt2-small' },
    tokenizerPath: join(FIXTURE, 'tokenizer.json'),
  });
  t.diagnostic(`demo:gpt2-small generated, loaded and warmed in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  try {
    const app = stack.services.app;
    const backbone = (await request(app).get('/v1/backbone').expect(200)).body;
    assert.equal(backbone.name, 'demo:gpt2-small');
    const t1 = performance.now();
    const res = await request(app).post('/v1/deltas').field('id', 'gpt2-lora')
      .attach('config', await readFile(join(FIXTURE, 'adapter_config.json')), 'adapter_config.json')
      .attach('weights', await readFile(join(FIXTURE, 'adapter_model.safetensors')), 'adapter_model.safetensors');
    assert.equal(res.status, 201, JSON.stringify(res.body));
    assert.equal(res.body.format, 'peft');
    assert.equal(res.body.type, 'lora');
    assert.equal(res.body.rank, 8);
    assert.equal(res.body.sites, 36, 'c_attn, attn.c_proj and mlp.c_proj (both match the suffix c_proj) in 12 layers');

    const prompt = 'The capital of France is';
    const withIt = await request(app).post('/v1/generate').send({ task: 'gpt2-lora', inputs: prompt, parameters: { max_new_tokens: 8 } });
    assert.equal(withIt.status, 200, JSON.stringify(withIt.body));
    assert.equal(withIt.body.task, 'gpt2-lora');
    assert.equal(withIt.body.details.prompt_tokens, 5, 'the real GPT-2 tokenizer: five tokens');
    assert.ok(withIt.body.details.generated_tokens >= 1);
    const chat = await request(app).post('/v1/completions').send({ model: 'gpt2-lora', prompt, max_tokens: 4, temperature: 0 });
    assert.equal(chat.status, 200, JSON.stringify(chat.body));
    t.diagnostic(`upload + two generations in ${((performance.now() - t1) / 1000).toFixed(1)} s`);
  } finally {
    await stack.close();
  }
});
