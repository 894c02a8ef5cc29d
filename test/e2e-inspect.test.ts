/**
 * `deltaserve inspect` as a user runs it (a child process): the backbone's
 * module tree with the graph sites on each module, and with `--task` where a
 * stored delta of any kind attaches, what OpenDelta's `delta.log()` shows.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import type { Backbone } from '../src/backbone/backbone.js';
import { demo, loadCases, testCacheDir } from './helpers/engine-graph.js';

const REPO = fileURLToPath(new URL('..', import.meta.url));
let bb: Backbone;
let store: string;

/** Runs the CLI on the test's model cache (the demo is already generated there). */
async function cli(...args: string[]): Promise<string> {
  const env = { ...process.env, DELTASERVE_CACHE_DIR: testCacheDir() };
  const { stdout } = await promisify(execFile)(process.execPath, ['--import', 'tsx', 'src/cli.ts', ...args], { cwd: REPO, env });
  return stdout;
}

before(async () => {
  ({ bb } = await demo('demo:gpt2'));
  store = join(testCacheDir(), 'inspect-store');
  await loadCases(bb, [
    { id: 'compacter', kind: 'compacter', reductionFactor: 8, n: 4, factorizedPhm: true, factorizedRule: false, activation: 'relu', targets: ['mlp.c_proj'], seed: 1 },
    { id: 'low-rank', kind: 'low_rank_adapter', reductionFactor: 8, activation: 'gelu_new', targets: ['attn.c_proj'], seed: 2 },
  ], store);
});

test('inspect: every linear with its graph sites, IA³ where PEFT puts it', async () => {
  const out = await cli('inspect', '--model', 'demo:gpt2');
  assert.match(out, /^demo:gpt2 \(gpt2, 17 linear modules/);
  assert.match(out, /c_attn — Linear 128→384 {2}\[sites: lora, bias, ia3\]/);
  assert.match(out, /c_fc — Linear 128→512 {2}\[sites: lora, bias\]/);
  assert.match(out, /c_proj — Linear 512→128 {2}\[sites: lora, adapter, bias, ia3, compacter, low_rank_adapter\]/);
  assert.match(out, /c_proj — Linear 128→128 {2}\[sites: lora, adapter, bias, compacter, low_rank_adapter\]/);
});

test('inspect --task: the delta\'s kind, and on each module it touches the site serving it and the shapes', async () => {
  const out = await cli('inspect', '--model', 'demo:gpt2', '--deltas-dir', store, '--task', 'compacter');
  assert.match(out, /^compacter: compacter \(opendelta\), rank 16, 4 sites, \d+ bytes$/m);
  // Served factored (n 4, rank-1 factors): L' [128/4, 4·1], N [4·4·1, 16], its bias, M [16, 4·4·1], R' [4·1, 128/4], its bias.
  assert.match(out, /c_proj — Linear 512→128 {2}\[compacter on the compacter site: \[32, 4\] \[16, 16\] \[16\] \[16, 16\] \[4, 32\] \[128\]\]/);
  assert.doesNotMatch(out, /c_attn — .*compacter/);
  const json = JSON.parse(await cli('inspect', '--model', 'demo:gpt2', '--deltas-dir', store, '--task', 'compacter', '--json'));
  assert.equal(json.type, 'compacter');
  assert.deepEqual(json.sites.map((s: { module: string }) => s.module), [0, 1, 2, 3].map((l) => `transformer.h.${l}.mlp.c_proj`));
});

test('inspect --task: a low-rank adapter on its own site, its rank-1 factors as served', async () => {
  const out = await cli('inspect', '--model', 'demo:gpt2', '--deltas-dir', store, '--task', 'low-rank');
  assert.match(out, /^low-rank: low_rank_adapter \(opendelta\), rank 16, 4 sites, \d+ bytes$/m);
  // W_left [128, 1], W_right [1, 16] (shown as [16], a row bank's leading 1), b [16]; then the up-projection's [16, 1], [1, 128] and [128].
  assert.match(out, /c_proj — Linear 128→128 {2}\[low_rank_adapter on the low_rank_adapter site: \[128, 1\] \[16\] \[16\] \[16, 1\] \[128\] \[128\]\]/);
  assert.doesNotMatch(out, /c_fc — .*low_rank_adapter/);
});

test('inspect --task on a task the store does not have says so and exits 1', async () => {
  await assert.rejects(cli('inspect', '--model', 'demo:gpt2', '--deltas-dir', join(store, 'nowhere'), '--task', 'ghost'),
    (err: { code: number; stderr: string }) => err.code === 1 && /no delta 'ghost'/.test(err.stderr));
});
