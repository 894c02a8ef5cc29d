/**
 * The local multi-replica stack on real parts (`npm run stack`): two replicas
 * sharing one store folder behind Debian's nginx, which routes by task, and
 * Debian's Prometheus scraping both with deploy/prometheus/rules.yml. Which
 * replica served what is read from each replica's own /metrics.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { parse } from 'yaml';
import type { BackboneInfo } from '../../src/backbone/types.js';
import { readState, stackPrerequisitesMissing, type LocalStackState } from '../../scripts/lib/local-stack.js';
import { DEPLOY, KUBERNETES, exposedSampleNames, find, promqlMetricNames, readYaml, renderKustomization } from '../helpers/deploy.js';
import { peftLora, scratch, spawnInRepo } from '../helpers/e2e-stack.js';

/** What the stack needs from Debian (scripts/ci-setup.sh installs it as root); without it every test here says it skipped. */
const missingPackages = stackPrerequisitesMissing();
const skip = missingPackages.length ? `not installed: ${missingPackages.join(', ')} (run scripts/ci-setup.sh as root)` : false;

let work: Awaited<ReturnType<typeof scratch>>;
let stack: LocalStackState;
const dir = () => join(work.dir, 'stack');

/** Runs one of the package's npm scripts to its end; its output on failure. */
async function npmRun(script: string, args: string[], env: Record<string, string> = {}): Promise<string> {
  const child = spawnInRepo('npm', ['run', '-s', script, '--', ...args], env);
  const { code } = await child.exited;
  assert.equal(code, 0, `npm run ${script} failed:\n${child.output()}`);
  return child.output();
}

before(async () => {
  if (skip) return;
  work = await scratch('stack');
  // One request at a time per replica, so a handful of requests backs a queue up;
  // alerts hold for 3 s instead of minutes (their expressions are the real ones).
  await npmRun('stack', ['--dir', dir(), '--model', 'demo', '--scrape-interval', '1s', '--alert-for', '3s'], {
    DELTASERVE_MAX_BATCH: '1', DELTASERVE_DRAIN_SECONDS: '5', DELTASERVE_CACHE_DIR: join(work.dir, 'cache'),
  });
  stack = readState(dir())!;
});

after(async () => {
  if (stack && readState(dir())) await npmRun('stack:down', ['--dir', dir()]);
  await work?.remove();
});

const post = (url: string, body: unknown, headers: Record<string, string> = {}, signal?: AbortSignal) =>
  fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body), signal });

async function generate(base: string, task: string | null, inputs: string, headers: Record<string, string> = {}): Promise<{ status: number; text: string }> {
  const res = await post(`${base}/v1/generate`, { task, inputs, parameters: { max_new_tokens: 8 } }, headers);
  const body = (await res.json()) as { generated_text?: string };
  return { status: res.status, text: body.generated_text ?? '' };
}

/** A replica's own count of generation requests (every task and status), from its /metrics. */
async function requestCounts(url: string): Promise<Map<string, number>> {
  const text = await (await fetch(`${url}/metrics`)).text();
  const counts = new Map<string, number>();
  for (const m of text.matchAll(/^deltaserve_request_duration_seconds_count\{task="([^"]*)",status="(\d+)"\} (\d+)$/gm)) {
    counts.set(`${m[1]} ${m[2]}`, Number(m[3]));
  }
  return counts;
}

/** Index of each replica whose counts grew while `act` ran, with by how much per "task status". */
async function servedBy(act: () => Promise<unknown>): Promise<Map<number, Map<string, number>>> {
  const beforeCounts = await Promise.all(stack.replicas.map((r) => requestCounts(r.url)));
  await act();
  const afterCounts = await Promise.all(stack.replicas.map((r) => requestCounts(r.url)));
  const served = new Map<number, Map<string, number>>();
  afterCounts.forEach((counts, i) => {
    for (const [key, n] of counts) {
      const grew = n - (beforeCounts[i].get(key) ?? 0);
      if (grew > 0) served.set(i, new Map([...(served.get(i) ?? []), [key, grew]]));
    }
  });
  return served;
}

/** A PEFT LoRA on the served backbone's default LoRA targets, built from what GET /v1/backbone says. */
async function loraFor(url: string, seed: number): Promise<Record<string, Buffer>> {
  const b = (await (await fetch(`${url}/v1/backbone`)).json()) as {
    name: string; modules: { name: string; in_features: number; out_features: number }[]; default_targets: { lora: string[] };
  };
  const info = { name: b.name, modules: b.modules.map((m) => ({ name: m.name, inFeatures: m.in_features, outFeatures: m.out_features })) } as BackboneInfo;
  return peftLora(info, seed, { targets: b.default_targets.lora });
}

async function register(url: string, id: string, files: Record<string, Buffer>, replace = false): Promise<number> {
  const form = new FormData();
  form.append('id', id);
  for (const [name, content] of Object.entries(files)) form.append('file', new Blob([new Uint8Array(content)]), name);
  const res = await fetch(`${url}/v1/deltas${replace ? '?replace=true' : ''}`, { method: 'POST', body: form });
  await res.arrayBuffer();
  return res.status;
}

let shared = ''; // the task registered through replica A and routed to replica B

test('a delta registered through replica A is served through nginx by replica B from the shared store; a replace on A is seen on B at its next request', { skip }, async () => {
  const [A, B] = stack.replicas;
  // A task id nginx routes to B: ask for unknown tasks until B is the one that answers 404.
  for (let i = 0; i < 32 && !shared; i++) {
    const served = await servedBy(() => generate(stack.url, `shared-${i}`, 'x'));
    if (served.has(1)) shared = `shared-${i}`;
  }
  assert.ok(shared, 'some task id hashes to replica B');
  assert.equal(await register(A.url, shared, await loraFor(A.url, 1)), 201, 'registered through replica A itself');

  const prompt = 'The shared store';
  let viaNginx!: { status: number; text: string };
  const served = await servedBy(async () => (viaNginx = await generate(stack.url, shared, prompt)));
  assert.deepEqual([...served.keys()], [1], 'replica B served it');
  assert.equal(served.get(1)!.get(`${shared} 200`), 1);
  assert.equal(viaNginx.status, 200);
  const onA = await generate(A.url, shared, prompt);
  assert.equal(viaNginx.text, onA.text, 'B applied the same delta A registered');
  const bare = await generate(B.url, null, prompt);
  assert.notEqual(viaNginx.text, bare.text, 'the delta changes the output');

  assert.equal(await register(A.url, shared, await loraFor(A.url, 2), true), 201, 'replaced through replica A');
  let afterReplace!: { status: number; text: string };
  const servedAgain = await servedBy(async () => (afterReplace = await generate(stack.url, shared, prompt)));
  assert.deepEqual([...servedAgain.keys()], [1]);
  assert.equal(afterReplace.text, (await generate(A.url, shared, prompt)).text, 'B serves the new version at its next request');
  assert.notEqual(afterReplace.text, viaNginx.text, 'not the old one');
});

test('requests for one task land on one replica, whichever route and field carries the task; requests without one are spread', { skip }, async () => {
  const counts = (served: Map<number, Map<string, number>>) => JSON.stringify([...served].map(([i, c]) => [i, Object.fromEntries(c)]));
  for (const task of ['demo-lora', 'demo-adapter', 'demo-bitfit', shared]) {
    const served = await servedBy(async () => {
      await generate(stack.url, task, 'Hello');
      await post(`${stack.url}/v1/completions`, { model: task, prompt: 'Hello', max_tokens: 2 }).then((r) => r.arrayBuffer());
      await post(`${stack.url}/v1/chat/completions`, { model: task, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 2 }).then((r) => r.arrayBuffer());
    });
    assert.equal(served.size, 1, `${task}: one replica (${counts(served)})`);
    const [[holder, tally]] = [...served];
    assert.equal(tally.get(`${task} 200`), 3, `${task}: native, completions and chat all on replica ${holder}`);
    // The header routes a request whose body names no task (it runs the bare backbone) to the task's replica.
    const byHeader = await servedBy(() => generate(stack.url, null, 'Hello', { 'X-Deltaserve-Task': task }));
    assert.deepEqual([...byHeader.keys()], [holder], `${task} by header: ${counts(byHeader)}`);
  }
  const bare = await servedBy(async () => {
    for (let i = 0; i < 4; i++) await generate(stack.url, null, `bare ${i}`);
  });
  assert.equal(bare.size, 2, `bare requests reach both replicas (${counts(bare)})`);
});

async function promQuery(expr: string): Promise<{ metric: Record<string, string>; value: [number, string] }[]> {
  const res = await fetch(`${stack.prometheusUrl}/api/v1/query?query=${encodeURIComponent(expr)}`);
  const body = (await res.json()) as { status: string; error?: string; data: { result: { metric: Record<string, string>; value: [number, string] }[] } };
  assert.equal(body.status, 'success', `${expr}: ${body.error}`);
  return body.data.result;
}

async function eventually<T>(what: string, probe: () => Promise<T | null>, timeoutMs = 60_000): Promise<T> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== null) return v;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

const promtool = (...args: string[]) => execFileSync('promtool', args, { encoding: 'utf8', stdio: 'pipe' });

test('Prometheus scrapes both replicas; promtool check config, check rules and the rules\' unit tests pass', { skip }, async () => {
  const instances = await eventually('deltaserve_generated_tokens_total from both replicas', async () => {
    const seen = new Set((await promQuery('deltaserve_generated_tokens_total')).map((s) => s.metric.instance));
    return seen.size === 2 ? seen : null;
  });
  assert.deepEqual([...instances].sort(), stack.replicas.map((r) => new URL(r.url).host).sort());
  assert.match(promtool('check', 'config', join(stack.dir, 'prometheus.yml')), /SUCCESS/);
  assert.match(promtool('check', 'config', join(DEPLOY, 'prometheus/prometheus.yml')), /SUCCESS/);
  assert.match(promtool('check', 'rules', join(DEPLOY, 'prometheus/rules.yml')), /SUCCESS: 17 rules found/);
  assert.match(promtool('test', 'rules', join(DEPLOY, 'prometheus/rules.test.yml')), /SUCCESS/);
});

test('backing up one replica\'s queue fires DeltaserveQueueBackingUp for that replica', { skip, timeout: 120_000 }, async () => {
  // All on one task, so all on one replica; it runs one request at a time.
  const task = 'demo-bitfit';
  let stop = false;
  const ctl = new AbortController();
  const workers = Array.from({ length: 14 }, async () => {
    while (!stop) {
      await post(`${stack.url}/v1/generate`, { task, inputs: 'Keep the queue long', parameters: { max_new_tokens: 48 } }, {}, ctl.signal)
        .then((r) => r.arrayBuffer()).catch(() => {});
    }
  });
  try {
    const firing = await eventually('the alert to fire', async () => {
      const res = (await (await fetch(`${stack.prometheusUrl}/api/v1/alerts`)).json()) as { data: { alerts: { labels: Record<string, string>; state: string }[] } };
      return res.data.alerts.find((a) => a.labels.alertname === 'DeltaserveQueueBackingUp' && a.state === 'firing') ?? null;
    }, 90_000);
    const holder = [...(await servedBy(() => generate(stack.url, task, 'which replica?')))].map(([i]) => i);
    assert.deepEqual([firing.labels.instance], holder.map((i) => new URL(stack.replicas[i].url).host), 'on the replica that holds the task');
  } finally {
    stop = true;
    ctl.abort();
    await Promise.all(workers);
  }
  // Leave the stack idle for what follows: cancelled requests leave the queue.
  await eventually('the queues to drain', async () => ((await promQuery('sum(deltaserve_num_requests_waiting)'))[0]?.value[1] === '0' ? true : null), 30_000);
});

test('every metric name the picker, the HPA, its adapter, the rules and the dashboard use exists in a live /metrics scrape; the dashboard\'s queries run', { skip }, async () => {
  const scraped = exposedSampleNames(await (await fetch(`${stack.replicas[0].url}/metrics`)).text());
  const rules = readYaml<{ groups: { rules: { record?: string; alert?: string; expr: string }[] }[] }>(join(DEPLOY, 'prometheus/rules.yml')).groups.flatMap((g) => g.rules);
  const recorded = new Set(rules.filter((r) => r.record).map((r) => r.record!));
  const base = renderKustomization(join(KUBERNETES, 'base'));

  const uses: [string, string][] = []; // [where, metric name]
  const eppConfig = parse(find(base, 'ConfigMap', 'deltaserve-epp').data!['config.yaml']);
  for (const engine of eppConfig.plugins.find((p: { type: string }) => p.type === 'core-metrics-extractor').parameters.engineConfigs) {
    for (const [field, spec] of Object.entries(engine)) {
      if (field.endsWith('Spec') && spec) for (const n of promqlMetricNames(spec as string)) uses.push([`endpoint picker ${field}`, n]);
    }
  }
  for (const m of find(base, 'HorizontalPodAutoscaler', 'deltaserve').spec.metrics) uses.push(['HPA', m.pods.metric.name]);
  for (const r of readYaml(join(KUBERNETES, 'prometheus-adapter-values.yaml')).rules.custom) {
    for (const n of promqlMetricNames(r.seriesQuery)) uses.push(['prometheus-adapter seriesQuery', n]);
    uses.push(['prometheus-adapter name', r.name.as]);
  }
  for (const r of rules) for (const n of promqlMetricNames(r.expr)) uses.push([`rule ${r.record ?? r.alert}`, n]);
  const dashboard = JSON.parse(readFileSync(join(DEPLOY, 'grafana/deltaserve.json'), 'utf8'));
  const exprs: string[] = dashboard.panels.flatMap((p: { targets?: { expr: string }[] }) => (p.targets ?? []).map((t) => t.expr.replaceAll('$instance', '.*').replaceAll('$task', '.*')));
  for (const e of exprs) for (const n of promqlMetricNames(e)) uses.push(['dashboard', n]);
  for (const v of dashboard.templating.list) if (v.type === 'query') uses.push([`dashboard variable ${v.name}`, /label_values\((\w+),/.exec(v.definition)![1]]);

  assert.ok(uses.length > 40);
  const missing = uses.filter(([, n]) => !scraped.has(n) && !recorded.has(n) && n !== 'up');
  assert.deepEqual(missing, [], 'named but not exported');
  // `up` is Prometheus' own; recording rules are Prometheus' too: both must exist on the stack's Prometheus.
  assert.equal((await promQuery('up{job="deltaserve"} == 1')).length, 2);
  for (const r of recorded) await eventually(`${r} to be recorded`, async () => ((await promQuery(r)).length > 0 ? true : null), 30_000);
  for (const e of exprs) assert.ok((await promQuery(e)).length > 0, `the dashboard's ${e} returns series`);
});

test('npm run stack:down stops exactly the recorded processes', { skip }, async () => {
  const pids = readState(dir())!.processes.map((p) => p.pid);
  assert.equal(pids.length, 4, 'two replicas, nginx, Prometheus');
  const out = await npmRun('stack:down', ['--dir', dir()]);
  assert.match(out, /stopped prometheus.*nginx.*replica-1.*replica-0/);
  // Gone, or a zombie its new parent (pid 1) has not reaped yet: either way, not running.
  const running = (pid: number) => existsSync(`/proc/${pid}`) && !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, 'utf8'));
  for (const pid of pids) assert.ok(!running(pid), `pid ${pid} still runs`);
  assert.equal(readState(dir()), null);
});
