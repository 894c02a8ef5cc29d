/** The execution provider: a missing CUDA provider is a clear error, not a crash or a silent CPU run. */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { buildDemoGraph } from '../src/backbone/demo/build.js';
import { DEMO_SPECS } from '../src/backbone/demo/spec.js';
import { createSession, ProviderUnavailableError } from '../src/backbone/session.js';

const ortDir = dirname(createRequire(import.meta.url).resolve('onnxruntime-node/package.json'));
const cudaInstalled = existsSync(join(ortDir, 'bin', 'napi-v6', process.platform, process.arch, 'libonnxruntime_providers_cuda.so'));

test('DELTASERVE_EP=cuda without the CUDA provider says what is missing and how to install it', { skip: cudaInstalled && 'the CUDA provider is installed here' }, async () => {
  const model = buildDemoGraph(DEMO_SPECS['demo:llama']).encode('demo:llama');
  await assert.rejects(createSession(model, { ep: 'cuda' }), (e: Error) => {
    assert.ok(e instanceof ProviderUnavailableError, `got ${e.name}: ${e.message}`);
    assert.match(e.message, /CUDA execution provider is not installed/);
    assert.match(e.message, /--onnxruntime-node-install=cuda12/);
    assert.match(e.message, /DELTASERVE_EP=cpu/);
    return true;
  });
});

test('the CPU provider runs the same model', async () => {
  const session = await createSession(buildDemoGraph(DEMO_SPECS['demo:llama']).encode('demo:llama'), { ep: 'cpu' });
  assert.ok(session.inputNames.includes('input_ids'));
  assert.ok(session.outputNames.includes('logits'));
});
