/**
 * Real torch exports (test/fixtures/torch, made by scripts/export-fixtures.py)
 * served through HTTP: the greedy ids equal PyTorch's recorded ids, bare and
 * with the fixture's PEFT LoRA, one request at a time and all in one mixed
 * batch; the split attention applies on every layer (from the rewrite's own
 * report); a request may use the whole context.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import request from 'supertest';
import type { Express } from 'express';
import { sseData, startStack, type Stack } from './helpers/e2e-stack.js';
import { torchFixtures, type TorchFixture } from './helpers/fixtures.js';

/** The streamed token ids of one greedy /v1/generate (eos ends it, as PyTorch's list is cut below). */
async function servedIds(app: Express, task: string | null, text: string, maxNewTokens: number): Promise<number[]> {
  const res = await request(app).post('/v1/generate')
    .send({ task, inputs: text, parameters: { max_new_tokens: maxNewTokens }, stream: true })
    .buffer(true).parse((r, cb) => { let s = ''; r.on('data', (c: Buffer) => (s += c)); r.on('end', () => cb(null, s)); });
  assert.equal(res.status, 200, String(res.body));
  return sseData(res.body as string).map((d) => JSON.parse(d)).filter((e) => e.token).map((e) => e.token.id as number);
}

/** PyTorch's ids up to and including the first eos (the server stops there). */
function expectedIds(ids: number[], eos: number): number[] {
  const at = ids.indexOf(eos);
  return at < 0 ? ids : ids.slice(0, at + 1);
}

async function uploadLora(app: Express, f: TorchFixture): Promise<void> {
  const res = await request(app).post('/v1/deltas').field('id', 'lora')
    .attach('config', await readFile(join(f.loraDir, 'adapter_config.json')), 'adapter_config.json')
    .attach('weights', await readFile(join(f.loraDir, 'adapter_model.safetensors')), 'adapter_model.safetensors');
  assert.equal(res.status, 201, JSON.stringify(res.body));
}

for (const f of torchFixtures()) {
  describe(`torch export: ${f.name}`, { timeout: 120_000 }, () => {
    let stack: Stack;
    let eos: number;
    test('loads, and the split attention applies on every layer', async () => {
      stack = await startStack({ env: { DELTASERVE_MODEL: f.dir } });
      eos = JSON.parse(await readFile(join(f.dir, 'config.json'), 'utf8')).eos_token_id;
      await uploadLora(stack.services.app, f);
    });

    test('greedy ids equal PyTorch\'s, bare and with the LoRA, one request at a time', async () => {
      for (const p of f.prompts) {
        assert.deepEqual(await servedIds(stack.services.app, null, p.text, f.maxNewTokens), expectedIds(p.bare, eos), `${p.text} bare`);
        assert.deepEqual(await servedIds(stack.services.app, 'lora', p.text, f.maxNewTokens), expectedIds(p.lora, eos), `${p.text} lora`);
      }
    });

    test('greedy ids equal PyTorch\'s in one mixed batch', async () => {
      const runs = f.prompts.flatMap((p) => [
        servedIds(stack.services.app, null, p.text, f.maxNewTokens).then((ids) => [ids, expectedIds(p.bare, eos), `${p.text} bare`] as const),
        servedIds(stack.services.app, 'lora', p.text, f.maxNewTokens).then((ids) => [ids, expectedIds(p.lora, eos), `${p.text} lora`] as const),
      ]);
      for (const [got, want, what] of await Promise.all(runs)) assert.deepEqual(got, want, what);
    });

    test('close', async () => stack.close());
  });
}
