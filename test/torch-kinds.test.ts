/**
 * Every delta kind on the real torch exports: the deltas written by
 * scripts/record-torch-kinds.py in their formats (OpenDelta's adapter, BitFit,
 * compacter, low-rank and parallel adapter; PEFT's IA³) are uploaded over
 * HTTP, and the served greedy ids equal PyTorch's recorded ids for the model
 * with the delta's ops hooked onto its modules: each kind alone, then every
 * kind, the fixture's LoRA and bare rows in one mixed batch.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import request from 'supertest';
import { startStack, streamedIds, uploadFolder, type Stack } from './helpers/e2e-stack.js';
import { torchFixtures, torchKinds, untilEos } from './helpers/fixtures.js';

for (const f of torchFixtures()) {
  const kinds = torchKinds(f);
  if (!kinds.length) continue;
  describe(`every delta kind on the torch export ${f.name}`, { timeout: 180_000 }, () => {
    let stack: Stack;
    let eos: number;
    test('every kind registers, as its kind', async () => {
      stack = await startStack({ env: { DELTASERVE_MODEL: f.dir } });
      eos = JSON.parse(await readFile(join(f.dir, 'config.json'), 'utf8')).eos_token_id;
      for (const k of kinds) {
        const res = await uploadFolder(stack.services.app, k.kind, k.dir);
        assert.equal(res.status, 201, `${k.kind}: ${JSON.stringify(res.body)}`);
        assert.equal(res.body.type, k.kind);
      }
      // The recorded compacters (n 4, rank-1 factors) are served factored, through the compacter site.
      const compacter = await request(stack.services.app).get('/v1/deltas/compacter').expect(200);
      assert.deepEqual([...new Set(compacter.body.sites.map((s: { site: string }) => s.site))], ['compacter']);
      // The recorded low-rank adapters are served factored, through the low-rank adapter site.
      const lowRank = await request(stack.services.app).get('/v1/deltas/low_rank_adapter').expect(200);
      assert.ok(lowRank.body.sites.length > 0);
      assert.deepEqual([...new Set(lowRank.body.sites.map((s: { site: string }) => s.site))], ['low_rank_adapter']);
      assert.equal((await uploadFolder(stack.services.app, 'lora', f.loraDir)).status, 201);
    });

    test('each kind alone: greedy ids equal PyTorch\'s', async () => {
      for (const k of kinds) {
        for (const p of k.prompts) {
          assert.deepEqual(await streamedIds(stack.services.app, k.kind, p.text, f.maxNewTokens), untilEos(p.ids, eos), `${k.kind}: ${p.text}`);
        }
      }
    });

    test('every kind, the LoRA and bare rows in one mixed batch: each row equals PyTorch\'s', async () => {
      const rows: Promise<readonly [number[], number[], string]>[] = [];
      const ask = (task: string | null, text: string, want: number[]) =>
        rows.push(streamedIds(stack.services.app, task, text, f.maxNewTokens).then((got) => [got, untilEos(want, eos), `${task ?? 'bare'}: ${text}`] as const));
      for (const [i, p] of f.prompts.entries()) {
        for (const k of kinds) ask(k.kind, p.text, k.prompts[i].ids);
        ask('lora', p.text, p.lora);
        ask(null, p.text, p.bare);
      }
      for (const [got, want, what] of await Promise.all(rows)) assert.deepEqual(got, want, what);
    });

    test('close', async () => stack.close());
  });
}
