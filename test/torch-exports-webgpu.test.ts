/**
 * The real torch exports (test/fixtures/torch) served with DELTASERVE_EP=webgpu
 * through HTTP and the engine worker: greedy ids equal PyTorch's recorded ids
 * (which torch-exports.test.ts holds the CPU path to), bare and with the
 * fixture's PEFT LoRA, all in one mixed batch whose rows join and leave as
 * requests arrive and finish. Skips loudly where WebGPU has no adapter.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import request from 'supertest';
import type { Express } from 'express';
import { sseData, startStack, type Stack } from './helpers/e2e-stack.js';
import { torchFixtures, type TorchFixture } from './helpers/fixtures.js';
import { webgpuMissing } from './helpers/webgpu.js';

const missing = webgpuMissing();

async function servedIds(app: Express, task: string | null, text: string, maxNewTokens: number): Promise<number[]> {
  const res = await request(app).post('/v1/generate')
    .send({ task, inputs: text, parameters: { max_new_tokens: maxNewTokens }, stream: true })
    .buffer(true).parse((r, cb) => { let s = ''; r.on('data', (c: Buffer) => (s += c)); r.on('end', () => cb(null, s)); });
  assert.equal(res.status, 200, String(res.body));
  return sseData(res.body as string).map((d) => JSON.parse(d)).filter((e) => e.token).map((e) => e.token.id as number);
}

const expectedIds = (ids: number[], eos: number) => (ids.indexOf(eos) < 0 ? ids : ids.slice(0, ids.indexOf(eos) + 1));

async function uploadLora(app: Express, f: TorchFixture): Promise<void> {
  const res = await request(app).post('/v1/deltas').field('id', 'lora')
    .attach('config', await readFile(join(f.loraDir, 'adapter_config.json')), 'adapter_config.json')
    .attach('weights', await readFile(join(f.loraDir, 'adapter_model.safetensors')), 'adapter_model.safetensors');
  assert.equal(res.status, 201, JSON.stringify(res.body));
}

for (const f of torchFixtures()) {
  describe(`torch export on WebGPU: ${f.name}`, { timeout: 180_000, skip: missing ?? false }, () => {
    let stack: Stack;
    test('greedy ids equal PyTorch\'s, bare and with the LoRA, in one mixed batch', async () => {
      stack = await startStack({ env: { DELTASERVE_MODEL: f.dir, DELTASERVE_EP: 'webgpu' } });
      try {
        const eos = JSON.parse(await readFile(join(f.dir, 'config.json'), 'utf8')).eos_token_id;
        await uploadLora(stack.services.app, f);
        const runs = f.prompts.flatMap((p) => [
          servedIds(stack.services.app, null, p.text, f.maxNewTokens).then((ids) => [ids, expectedIds(p.bare, eos), `${p.text} bare`] as const),
          servedIds(stack.services.app, 'lora', p.text, f.maxNewTokens).then((ids) => [ids, expectedIds(p.lora, eos), `${p.text} lora`] as const),
        ]);
        for (const [got, want, what] of await Promise.all(runs)) assert.deepEqual(got, want, what);
        // The CPU provider counts no transfer at all: bytes to the device show the WebGPU path ran.
        const metrics = (await request(stack.services.app).get('/metrics')).text;
        const sent = Number(/deltaserve_engine_transfer_bytes_total\{direction="to_device"\} (\S+)/.exec(metrics)?.[1]);
        assert.ok(sent > 0, `to_device bytes: ${sent}`);
      } finally {
        await stack.close();
      }
    });
  });
}
