import { mkdtemp } from 'node:fs/promises'; import { tmpdir } from 'node:os'; import { join } from 'node:path';
import { startTarget, probeHealth } from './test/reliability/server.js';
import { percentile } from './test/reliability/common.js';
const t = await startTarget(await mkdtemp(join(tmpdir(), 'rel-')));
for (const c of [1, 20, 200]) {
  const lat = await probeHealth(t.url, c, 3000);
  console.log('idle conc', c, 'n', lat.length, 'p50', percentile(lat, 50).toFixed(1), 'p99', percentile(lat, 99).toFixed(1));
}
// event loop delay of the server process itself while idle probing
const { monitorEventLoopDelay } = await import('node:perf_hooks');
const h = monitorEventLoopDelay({ resolution: 5 }); h.enable();
const lat = await probeHealth(t.url, 200, 3000);
h.disable();
console.log('conc200 again p99', percentile(lat, 99).toFixed(1), 'server loop delay p99 ms', (h.percentile(99) / 1e6).toFixed(1), 'max', (h.max / 1e6).toFixed(1));
await t.close();
