import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { Registry } from '../src/deltas/registry.js';
import { makeDemoDeltas } from '../src/deltas/demo-deltas.js';
import { gpt2Like, llamaLike } from './helpers/backbone-info.js';
import { tempDir } from './helpers/deltas.js';

for (const backbone of [gpt2Like(2, 16), llamaLike(2, 16, 24)]) {
  test(`demo deltas for a ${backbone.family} backbone register, load, and regenerate identically`, async (t) => {
    const dir = await tempDir(t, 'demo');
    const records = await makeDemoDeltas(backbone, dir);
    assert.deepEqual(records.map((r) => [r.id, r.type, r.format]), [
      ['demo-lora', 'lora', 'peft'],
      ['demo-adapter', 'adapter', 'opendelta'],
      ['demo-bitfit', 'bitfit', 'opendelta'],
    ]);
    const manifests = await Promise.all(records.map(async (r) => JSON.parse((await readFile(join(dir, r.id, 'manifest.json'))).toString()).files));
    await makeDemoDeltas(backbone, dir);
    const again = await Promise.all(records.map(async (r) => JSON.parse((await readFile(join(dir, r.id, 'manifest.json'))).toString()).files));
    assert.deepEqual(again, manifests);
    const registry = await Registry.open({ dir, backbone, cacheBytes: 1 << 20 });
    for (const r of records) assert.ok((await registry.load(r.id)).sites.length >= 2);
  });
}
