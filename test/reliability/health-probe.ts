/**
 * The suite's "health under load" phase alone, for profiling:
 *   node --import tsx --cpu-prof --cpu-prof-dir=/tmp/prof test/reliability/health-probe.ts [seconds] [probes]
 * `probes` (default 200) concurrent /healthz probes; 0 leaves only the 16 generating clients, so the
 * event-loop delay then shows what generation alone costs the server's main thread.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { healthUnderLoad } from './run.js';
import { percentile } from './common.js';
import { startTarget } from './server.js';

const seconds = Number(process.argv[2] ?? 10);
const probes = Number(process.argv[3] ?? 200);
const dir = await mkdtemp(join(tmpdir(), 'deltaserve-health-'));
const t = await startTarget(dir, { DELTASERVE_MAX_BATCH: '8', DELTASERVE_MAX_QUEUE: '8' });
try {
  const { lat, failed, loopP99, generated } = await healthUnderLoad(t, seconds, probes);
  console.log(JSON.stringify({ probes: lat.length, healthP50: percentile(lat, 50), healthP99: percentile(lat, 99), healthMax: percentile(lat, 100), loopP99, generated, failed: failed.length, firstFailure: failed[0], load: loadavg()[0] }));
} finally {
  await t.close();
  await rm(dir, { recursive: true, force: true });
}
