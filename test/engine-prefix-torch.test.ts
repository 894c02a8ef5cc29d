/**
 * Prompt learning against PyTorch: for each torch-exported fixture (GPT-2,
 * Llama with grouped-query attention, Qwen2-style), PEFT PREFIX_TUNING,
 * PROMPT_TUNING and P_TUNING deltas written by scripts/export-prompt-fixtures.py
 * with PyTorch's own greedy ids, computed the way PeftModelForCausalLM does
 * (past_key_values from get_prompt with the mask's ones prepended and
 * positions offset, or the prompt embeddings prepended to inputs_embeds).
 * Served by the real Engine on the fixture's model.onnx, each alone and all
 * together with bare rows in one batch, the ids must be PyTorch's.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import { loadBackbone, type Backbone } from '../src/backbone/backbone.js';
import { createSession } from '../src/backbone/session.js';
import { Registry } from '../src/deltas/registry.js';
import type { LoadedDelta } from '../src/deltas/types.js';
import { Engine } from '../src/engine/engine.js';
import { defaultGraph, testCacheDir, type Session } from './helpers/engine-graph.js';
import { torchFixtures } from './helpers/fixtures.js';

const GREEDY = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null };
const KINDS = ['prefix', 'prompt', 'ptuning'] as const;

interface Recorded {
  max_new_tokens: number;
  deltas: Record<(typeof KINDS)[number], { dir: string; virtual_tokens: number }>;
  prompts: ({ text: string; prompt_ids: number[]; bare: number[] } & Record<(typeof KINDS)[number], number[]>)[];
}

for (const fixture of torchFixtures()) {
  const { name } = fixture;
  const dir = join(fixture.recordedDir, 'prompt-learning');
  // gpt2-fp16's weights are rounded: scripts/export-prompt-fixtures.py records the float32 models (and their layout variants).
  if (!existsSync(dir)) continue;
  describe(`prompt learning on the torch fixture ${name}, against PyTorch's greedy ids`, () => {
    const rec = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as Recorded;
    let bb: Backbone;
    let session: Session;
    let sites: ReturnType<typeof defaultGraph>['sites'];
    const deltas = new Map<string, LoadedDelta>();

    before(async () => {
      bb = await loadBackbone({ model: fixture.dir, cacheDir: testCacheDir() });
      const g = defaultGraph(bb);
      assert.ok(g.promptEmbeds, 'the rewrite found the exported embedding Gather');
      sites = g.sites;
      session = await createSession(g.bytes);
      const registry = await Registry.open({ dir: join(testCacheDir(), `torch-prefix-${name}-${Math.random().toString(36).slice(2)}`), backbone: bb.info, cacheBytes: 2 ** 30 });
      for (const k of KINDS) {
        const files = ['adapter_config.json', 'adapter_model.safetensors'].map((f) => ({ name: f, path: join(dir, rec.deltas[k].dir, f) }));
        await registry.register(k, files, { replace: false });
        deltas.set(k, await registry.load(k));
      }
    });

    async function serve(rows: { delta: LoadedDelta | null; promptIds: number[] }[]): Promise<number[][]> {
      const e = new Engine(session, bb.io, sites, { maxBatch: 32, prefillChunkTokens: 512, eosTokenIds: [], maxPositions: bb.info.maxPositions });
      const out = rows.map(() => [] as number[]);
      rows.forEach((r, rowId) => e.add({ rowId, promptIds: r.promptIds, sampling: GREEDY, maxNewTokens: rec.max_new_tokens, delta: r.delta }));
      while (!e.idle) for (const t of (await e.step()).tokens) out[t.rowId].push(t.token);
      return out;
    }

    test('each delta alone gives PyTorch\'s ids', async () => {
      for (const p of rec.prompts) {
        for (const k of KINDS) {
          const [got] = await serve([{ delta: deltas.get(k)!, promptIds: p.prompt_ids }]);
          assert.deepEqual(got, p[k], `${k} on ${JSON.stringify(p.text)}`);
        }
      }
    });

    test('all of them and bare rows in one batch give PyTorch\'s ids', async () => {
      const rows = rec.prompts.flatMap((p) => [
        ...KINDS.map((k) => ({ delta: deltas.get(k)!, promptIds: p.prompt_ids, want: p[k] })),
        { delta: null, promptIds: p.prompt_ids, want: p.bare },
      ]);
      const got = await serve(rows);
      rows.forEach((r, i) => assert.deepEqual(got[i], r.want, `row ${i} (${r.delta?.id ?? 'bare'})`));
    });
  });
}
