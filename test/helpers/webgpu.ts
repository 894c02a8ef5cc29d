/**
 * Whether this machine has a WebGPU adapter for onnxruntime-node (a GPU's
 * Vulkan driver, or Mesa's lavapipe: scripts/ci-setup.sh). Probed in a child
 * process, since a provider that finds no device may take its process down.
 * Tests that need it skip with a loud message when it is missing.
 */
import { spawnSync } from 'node:child_process';
import { ensureRuntimeDir } from '../../src/backbone/session.js';

let probed: string | null | undefined;

const PROBE = `
const ort = require('onnxruntime-node');
const { uploadGraph } = require(process.argv[1]);
ort.InferenceSession.create(uploadGraph(1), { executionProviders: ['webgpu'], logSeverityLevel: 4 })
  .then(() => process.exit(0), (e) => { console.error(String(e.message).split('\\n')[0]); process.exit(3); });
`;

/** null when WebGPU works here, else why not. */
export function webgpuMissing(): string | null {
  if (probed !== undefined) return probed;
  ensureRuntimeDir();
  const r = spawnSync(process.execPath, ['--import', 'tsx', '-e', PROBE, new URL('../../src/engine/device/row-graphs.ts', import.meta.url).pathname], {
    encoding: 'utf8', timeout: 120_000, env: process.env,
  });
  probed = r.status === 0 ? null : `no WebGPU adapter (${r.signal ?? `exit ${r.status}`}: ${(r.stderr || '').trim().split('\n').at(-1) ?? ''})`;
  if (probed) {
    console.warn(`\n!!! SKIPPING WebGPU tests: ${probed}. Install lavapipe (sudo bash scripts/ci-setup.sh) or run on a GPU host.\n`);
  }
  return probed;
}
