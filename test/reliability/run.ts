/**
 * The reliability suite: `npm run test:reliability` (full) or, with
 * `--profile quick`, the seed-fixed short run that `npm test` includes
 * (test/reliability.test.ts). Prints one table; exits 1 if any figure fails.
 *
 *   --profile quick|ci|full     defaults for the counts below (full: 10,000 + 10,000, 30 min soak)
 *   --upload-cases N --request-cases N --soak-minutes M --kill-rounds N --seed S
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { availableParallelism, loadavg } from 'node:os';
import type { BackboneInfo } from '../../src/backbone/types.js';
import { percentile, type CategoryResult } from './common.js';
import { engineStepFaults, faults, fuzzRequests, generateLoad, overload, probeHealth, sigkills, slowClients, soak, startTarget, type Target } from './server.js';
import { fuzzUploads } from './uploads.js';

export interface SuiteOptions {
  uploadCases: number;
  requestCases: number;
  soakMinutes: number;
  killRounds: number;
  seed: number;
  overloadRounds: number;
  loris: number;
  /** Seconds of /healthz probing at concurrency 200 beside generation traffic. */
  healthSeconds: number;
  /** Rounds of an engine step made to throw (8 requests each, 4 of them decoding when it does). */
  engineFaultRounds: number;
}

export const PROFILES: Record<string, SuiteOptions> = {
  quick: { uploadCases: 80, requestCases: 150, soakMinutes: 0.25, killRounds: 0, seed: 13, overloadRounds: 1, loris: 4, healthSeconds: 2, engineFaultRounds: 2 },
  ci: { uploadCases: 1000, requestCases: 1000, soakMinutes: 2, killRounds: 2, seed: 13, overloadRounds: 3, loris: 20, healthSeconds: 10, engineFaultRounds: 3 },
  full: { uploadCases: 10_000, requestCases: 10_000, soakMinutes: 30, killRounds: 6, seed: 13, overloadRounds: 5, loris: 50, healthSeconds: 20, engineFaultRounds: 10 },
};

export interface SuiteReport {
  results: CategoryResult[];
  healthUnderLoadP99: number;
  healthUnderOverloadP99: number;
  rssGrowthPct: number;
  table: string;
  ok: boolean;
}

/** /healthz at concurrency 200 (from a worker thread) while 16 clients (another worker thread) generate. */
export async function healthUnderLoad(t: Target, seconds: number, probes = 200): Promise<{ lat: number[]; failed: string[]; loopP99: number; generated: number }> {
  // The server's own event-loop delay: blocking work shows here; a starved CPU shows in the probes' latency too.
  const loop = monitorEventLoopDelay({ resolution: 10 });
  loop.enable();
  const failed: string[] = [];
  const [lat, generated] = await Promise.all([probeHealth(t.url, probes, seconds * 1000, failed), generateLoad(t.url, 16, seconds * 1000)]);
  loop.disable();
  return { lat, failed, loopP99: loop.percentile(99) / 1e6, generated };
}

export async function runSuite(opts: SuiteOptions, log: (line: string) => void = () => {}, onResult: (r: CategoryResult) => void = () => {}): Promise<SuiteReport> {
  const dir = await mkdtemp(join(tmpdir(), 'deltaserve-reliability-'));
  const results: CategoryResult[] = [];
  const push = results.push.bind(results);
  results.push = (...rs: CategoryResult[]) => {
    rs.forEach(onResult);
    return push(...rs);
  };
  let info: BackboneInfo | null = null;
  let loadLat: number[] = [];
  let loadFailed: string[] = [];
  let loopP99 = NaN;
  try {
    log(`uploads: ${opts.uploadCases} cases`);
    results.push(await fuzzUploads({ cases: opts.uploadCases, seed: opts.seed, dir: join(dir, 'uploads-fuzz') }));

    // Small limits so overload is reached and slow-loris is cut quickly.
    // The engine-step fault hook is mounted for the suite only (DELTASERVE_FAULTS is never set by default).
    const t = await startTarget(dir, { DELTASERVE_MAX_BATCH: '8', DELTASERVE_MAX_QUEUE: '8', DELTASERVE_FAULTS: 'engine-step' });
    info = t.stack.services.backbone.info;
    try {
      log(`requests: ${opts.requestCases} cases`);
      results.push(await fuzzRequests(t, opts.requestCases, opts.seed));
      log('health under load');
      ({ lat: loadLat, failed: loadFailed, loopP99 } = await healthUnderLoad(t, opts.healthSeconds));
      log('overload');
      results.push(await overload(t, opts.overloadRounds));
      log('slow clients');
      results.push(await slowClients(t, opts.loris));
      log('faults');
      results.push(await faults(t));
      results.push(await engineStepFaults(t, opts.engineFaultRounds));
      log(`soak: ${opts.soakMinutes} min`);
      results.push(await soak(t, opts.soakMinutes));
    } finally {
      await t.close();
    }
    if (opts.killRounds > 0) {
      log(`SIGKILL: ${opts.killRounds} rounds`);
      results.push(await sigkills(dir, opts.killRounds, info!));
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  const overloadResult = results.find((r) => r.category.startsWith('overload'))!;
  const soakResult = results.find((r) => r.category.startsWith('soak'))!;
  const healthUnderLoadP99 = percentile(loadLat, 99);
  const healthUnderOverloadP99 = overloadResult.figures.healthP99Ms;
  const rssGrowthPct = soakResult.figures.rssGrowthPct;
  const bad = results.some((r) => r.failures.length || r.crashes || r.fiveXX || r.dataLost || r.tempLeft);
  const ok = !bad && healthUnderLoadP99 <= 50 && rssGrowthPct <= 5;
  return { results, healthUnderLoadP99, healthUnderOverloadP99, rssGrowthPct, table: table(results, { healthUnderLoadP99, healthUnderOverloadP99, rssGrowthPct, loadProbes: loadLat.length, loadFailed, loopP99 }), ok };
}

function table(results: CategoryResult[], f: { healthUnderLoadP99: number; healthUnderOverloadP99: number; rssGrowthPct: number; loadProbes: number; loadFailed: string[]; loopP99: number }): string {
  const rows = [
    ['category', 'cases', 'accepted', 'refused 4xx', 'failures', 'crashes', '5xx (unexpected)', '5xx (injected fault, as designed)', 'data lost', 'temp left'],
    ...results.map((r) => [r.category, r.cases, r.accepted, r.refused, r.failures.length, r.crashes, r.fiveXX, r.injected5xx, r.dataLost, r.tempLeft].map(String)),
  ];
  const total = (k: keyof CategoryResult) => results.reduce((n, r) => n + (Array.isArray(r[k]) ? (r[k] as unknown[]).length : (r[k] as number)), 0);
  rows.push(['**total**', ...(['cases', 'accepted', 'refused', 'failures', 'crashes', 'fiveXX', 'injected5xx', 'dataLost', 'tempLeft'] as const).map((k) => String(total(k)))]);
  const md = rows.map((r, i) => `| ${r.join(' | ')} |${i === 0 ? `\n|${r.map(() => '---').join('|')}|` : ''}`).join('\n');
  const soakR = results.find((r) => r.category.startsWith('soak'))!;
  const slow = results.find((r) => r.category === 'slow clients')!;
  const over = results.find((r) => r.category.startsWith('overload'))!;
  const figures = [
    `| RSS growth over the soak, after warm-up (≤ 5 %) | ${f.rssGrowthPct.toFixed(2)} % (${soakR.figures.rssWarmMb.toFixed(0)} → ${soakR.figures.rssEndMb.toFixed(0)} MB) |`,
    `| /healthz p99 at concurrency 200 under load (≤ 50 ms) | ${f.healthUnderLoadP99.toFixed(1)} ms (${f.loadProbes} probes, 16 clients generating` +
      `${f.loadFailed.length ? `; ${f.loadFailed.length} failed (counted as 1e9 ms), first: ${f.loadFailed[0]}` : ''}) |`,
    `| the server's event-loop delay p99 during that load | ${f.loopP99.toFixed(1)} ms |`,
    `| machine load average (1 min) at the end | ${loadavg()[0].toFixed(1)} on ${availableParallelism()} cores |`,
    `| /healthz p99 at concurrency 50 under overload (2× capacity) | ${f.healthUnderOverloadP99.toFixed(1)} ms |`,
    `| /healthz p99 at concurrency 200 during the soak | ${soakR.figures.healthP99Ms.toFixed(1)} ms (${soakR.figures.healthProbes} probes) |`,
    `| overload: first request after the burst | ${over.figures.recoveryMs.toFixed(0)} ms; RSS +${over.figures.rssGrowthMb.toFixed(0)} MB |`,
    `| 8 requests beside 4 never-reading streams | ${slow.figures.besideStuckMs.toFixed(0)} ms; RSS +${slow.figures.rssGrowthMb.toFixed(0)} MB |`,
    `| slow-loris connections closed by the 3 s request timeout | all within ${(slow.figures.lorisClosedMaxMs / 1000).toFixed(1)} s |`,
  ];
  const failures = results.flatMap((r) => r.failures.slice(0, 5).map((m) => `- ${r.category}: ${m}`));
  return `${md}\n\n| figure | value |\n|---|---|\n${figures.join('\n')}${failures.length ? `\n\nFailures (first 5 per category):\n${failures.join('\n')}` : ''}`;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      profile: { type: 'string', default: 'full' },
      'upload-cases': { type: 'string' }, 'request-cases': { type: 'string' }, 'soak-minutes': { type: 'string' },
      'kill-rounds': { type: 'string' }, seed: { type: 'string' },
    },
  });
  const base = PROFILES[values.profile!];
  if (!base) throw new Error(`--profile must be one of ${Object.keys(PROFILES).join(', ')}`);
  const num = (v: string | undefined, d: number) => (v === undefined ? d : Number(v));
  const opts: SuiteOptions = {
    ...base,
    uploadCases: num(values['upload-cases'], base.uploadCases), requestCases: num(values['request-cases'], base.requestCases),
    soakMinutes: num(values['soak-minutes'], base.soakMinutes), killRounds: num(values['kill-rounds'], base.killRounds), seed: num(values.seed, base.seed),
  };
  const t0 = performance.now();
  const report = await runSuite(opts, (l) => console.error(`[${((performance.now() - t0) / 1000).toFixed(0)} s] ${l}`), (r) => console.error(JSON.stringify({ ...r, failures: r.failures.slice(0, 5) })));
  console.log(`deltaserve reliability suite — profile ${values.profile}, seed ${opts.seed}, ${opts.uploadCases} upload cases, ${opts.requestCases} request cases, ` +
    `${opts.soakMinutes} min soak, ${opts.killRounds} SIGKILL rounds; ${((performance.now() - t0) / 60000).toFixed(1)} min\n`);
  console.log(report.table);
  process.exitCode = report.ok ? 0 : 1;
}

if (import.meta.url === `file://${process.argv[1]}`) void main();
