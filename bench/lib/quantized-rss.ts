/**
 * One backbone's resident memory, alone in its process (bench/lib/quantized-step.ts
 * runs it per backbone): load it as the server does, build the engine session,
 * run decode steps at batch 32 with 32 distinct r16 LoRAs; print RSS as JSON.
 *
 *   node --expose-gc --import tsx bench/lib/quantized-rss.ts <model dir>
 */
import { readFileSync } from 'node:fs';
import { loadBackbone } from '../../src/backbone/backbone.js';
import { buildEngineGraph } from '../../src/backbone/rewrite/index.js';
import { createSession } from '../../src/backbone/session.js';
import { planSites } from '../../src/deltas/kinds/index.js';
import { DeltaBanks } from '../../src/engine/banks.js';
import { syntheticCAttnLora } from './common.js';
import { stepFeeds } from './rewrite-step.js';

const bb = await loadBackbone({ model: process.argv[2] });
// The rewritten graph's bytes are dropped once ORT has them, as in the server.
const { session, sites } = await (async () => {
  const g = buildEngineGraph(bb, planSites(bb));
  return { session: await createSession(g.bytes), sites: g.sites };
})();
(globalThis as { gc?: () => void }).gc?.();
const banks = new DeltaBanks(sites, { maxRows: 32, zeroSize: true });
for (let r = 0; r < 32; r++) banks.add(syntheticCAttnLora(bb, r, 16));
const feeds = { ...stepFeeds(bb, 32, 64), ...banks.feeds() };
for (let i = 0; i < 3; i++) await session.run(feeds);
// The peak from /proc (VmHWM, of this process's own memory map): getrusage's maxRSS carries the parent's peak over fork and exec.
const hwm = /VmHWM:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'));
console.log(JSON.stringify({ rss: process.memoryUsage().rss, maxRss: hwm ? Number(hwm[1]) * 1024 : NaN }));
process.exit(0);
