/**
 * The reliability suite's quick, seed-fixed profile (test/reliability/run.ts;
 * the full run is `npm run test:reliability`): a few hundred fuzzed uploads
 * and requests, overload, slow clients, faults and a 15-second soak against
 * the real stack. Every case must be a success or a 4xx that says why: no
 * failure, crash, 5xx, lost delta or temp file left. The latency and RSS
 * figures are printed, not asserted here (they are the full run's, on a quiet
 * machine; 15 seconds is too short a soak for a memory trend).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { PROFILES, runSuite } from './reliability/run.js';

test('reliability suite, quick profile: no failures, crashes, 5xx, data lost or temp files left', { timeout: 600_000 }, async (t) => {
  const report = await runSuite(PROFILES.quick);
  t.diagnostic(`\n${report.table}`);
  for (const r of report.results) {
    assert.deepEqual(r.failures, [], r.category);
    assert.equal(r.crashes, 0, r.category);
    assert.equal(r.fiveXX, 0, r.category);
    assert.equal(r.dataLost, 0, r.category);
    assert.equal(r.tempLeft, 0, r.category);
    assert.ok(r.cases > 0, r.category);
  }
});
