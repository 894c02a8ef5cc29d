/**
 * The local multi-replica stack, on real parts from Debian's packages:
 * deltaserve replicas sharing one store folder, nginx in front routing by task
 * with consistent hashing (deploy/local/), and Prometheus scraping every
 * replica with deploy/prometheus/rules.yml. Every process is started detached
 * with its pid recorded in `<dir>/state.json`, so `stopLocalStack` (npm run
 * stack:down) stops exactly those, from another process. Ports are free
 * loopback ports picked at start, so stacks in parallel do not collide.
 */
import { spawn } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync, closeSync } from 'node:fs';
import { createServer } from 'node:net';
import { join, resolve } from 'node:path';
import { parse, stringify } from 'yaml';
import { DEPLOY, REPO } from './paths.js';

const NJS_MODULE = '/usr/lib/nginx/modules/ngx_http_js_module.so';

export interface LocalStackOptions {
  /** Holds state.json, logs, generated configs, Prometheus' data; by default the store too. */
  dir: string;
  replicas?: number;
  /** DELTASERVE_MODEL of every replica. */
  model?: string;
  /** The shared store; default `<dir>/deltas`, seeded with the repo's demo deltas when the model is `demo`. */
  deltasDir?: string;
  /** Prometheus' scrape and rule evaluation interval. */
  scrapeInterval?: string;
  /** Replaces every alert's `for:` (the rules' expressions stay as they are): tests cannot wait minutes. */
  alertFor?: string;
}

export interface StackProcess {
  name: string;
  pid: number;
  /** Text of its command line (/proc/<pid>/cmdline), checked before each signal so that a reused pid is never hit. */
  marker: string;
  log: string;
}

export interface LocalStackState {
  dir: string;
  /** nginx, the stack's front door. */
  url: string;
  prometheusUrl: string;
  replicas: { url: string; pid: number }[];
  deltasDir: string;
  backbone: string;
  processes: StackProcess[];
}

const statePath = (dir: string) => join(dir, 'state.json');

export function readState(dir: string): LocalStackState | null {
  return existsSync(statePath(dir)) ? (JSON.parse(readFileSync(statePath(dir), 'utf8')) as LocalStackState) : null;
}

/** A free loopback port: bound, then released for the process that will listen on it. */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as { port: number };
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

const SBIN = ['/usr/sbin', '/sbin', '/usr/bin'];

function find(program: string): string | null {
  for (const dir of [...(process.env.PATH ?? '').split(':'), ...SBIN]) {
    if (dir && existsSync(join(dir, program))) return join(dir, program);
  }
  return null;
}

/** The Debian packages the stack (and its tests) need that are not installed. */
export function stackPrerequisitesMissing(): string[] {
  return [
    ...(find('nginx') ? [] : ['nginx']),
    ...(existsSync(NJS_MODULE) ? [] : ['libnginx-mod-http-js']),
    ...(find('prometheus') && find('promtool') ? [] : ['prometheus']),
  ];
}

function startDetached(name: string, command: string, args: string[], dir: string, env: NodeJS.ProcessEnv = process.env): StackProcess {
  // nginx retitles its master ("nginx: master process …") but keeps the arguments in it.
  const marker = args.join(' ');
  const log = join(dir, `${name}.log`);
  const fd = openSync(log, 'a');
  const child = spawn(command, args, { cwd: REPO, detached: true, stdio: ['ignore', fd, fd], env });
  closeSync(fd);
  child.unref();
  if (child.pid === undefined) throw new Error(`${name} did not start (${command})`);
  return { name, pid: child.pid, marker, log };
}

function alive(p: StackProcess): boolean {
  try {
    return readFileSync(`/proc/${p.pid}/cmdline`, 'utf8').replaceAll('\0', ' ').includes(p.marker);
  } catch {
    return false;
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function waitFor<T>(what: string, p: StackProcess, probe: () => Promise<T | null>, timeoutMs: number): Promise<T> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe().catch(() => null);
    if (value !== null) return value;
    if (!alive(p)) throw new Error(`${p.name} exited before ${what}; its log (${p.log}):\n${tail(p.log)}`);
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}; ${p.name}'s log (${p.log}):\n${tail(p.log)}`);
    await sleep(100);
  }
}

function tail(file: string, lines = 30): string {
  return existsSync(file) ? readFileSync(file, 'utf8').split('\n').slice(-lines).join('\n') : '(no log)';
}

async function ok(url: string): Promise<true | null> {
  const res = await fetch(url);
  await res.arrayBuffer();
  return res.ok ? true : null;
}

/** Fills `${NAME}` in a template; a name without a value is an error, not an empty string. */
function fillTemplate(template: string, values: Record<string, string>): string {
  return template.replace(/\$\{([A-Z_]+)\}/g, (_, name: string) => {
    if (!(name in values)) throw new Error(`template names \${${name}} but no value was given`);
    return values[name];
  });
}

/** deploy/prometheus/rules.yml, with every alert's `for:` replaced when asked. */
function stackRules(alertFor?: string): string {
  const rules = parse(readFileSync(join(DEPLOY, 'prometheus/rules.yml'), 'utf8')) as { groups: { rules: { alert?: string; for?: string }[] }[] };
  if (alertFor) for (const g of rules.groups) for (const r of g.rules) if (r.alert) r.for = alertFor;
  return stringify(rules, { lineWidth: 0 });
}

/** deploy/prometheus/prometheus.yml with the replicas as targets and the stack's rules. */
function stackPrometheusConfig(targets: string[], rulesFile: string, interval: string): string {
  const config = parse(readFileSync(join(DEPLOY, 'prometheus/prometheus.yml'), 'utf8')) as {
    global: Record<string, string>; rule_files: string[]; scrape_configs: { job_name: string; static_configs: { targets: string[] }[] }[];
  };
  config.global.scrape_interval = interval;
  config.global.evaluation_interval = interval;
  config.rule_files = [rulesFile];
  const job = config.scrape_configs.find((j) => j.job_name === 'deltaserve');
  if (!job) throw new Error('deploy/prometheus/prometheus.yml has no deltaserve job');
  job.static_configs = [{ targets }];
  return stringify(config, { lineWidth: 0 });
}

export async function startLocalStack(opts: LocalStackOptions): Promise<LocalStackState> {
  const dir = resolve(opts.dir);
  const previous = readState(dir);
  if (previous && previous.processes.some(alive)) {
    throw new Error(`a stack is already running from ${dir} (${previous.url}); stop it with npm run stack:down`);
  }
  const missing = stackPrerequisitesMissing();
  if (missing.length) throw new Error(`not installed: ${missing.join(', ')}; run scripts/ci-setup.sh as root (it installs them from Debian)`);
  const nginx = find('nginx')!;
  const prometheus = find('prometheus')!;
  mkdirSync(join(dir, 'nginx-tmp'), { recursive: true });

  const model = opts.model ?? 'demo';
  const deltasDir = resolve(opts.deltasDir ?? join(dir, 'deltas'));
  // ./deltas holds the demo deltas of `demo` (= demo:llama), as `npm start` serves them; other backbones start empty.
  if (!existsSync(deltasDir)) {
    if (model === 'demo' || model === 'demo:llama') cpSync(join(REPO, 'deltas'), deltasDir, { recursive: true });
    else mkdirSync(deltasDir, { recursive: true });
  }
  const processes: StackProcess[] = [];
  // Until the stack is up, state.json holds only the processes started so far: enough for stack:down.
  const record = (p: StackProcess) => {
    processes.push(p);
    writeFileSync(statePath(dir), JSON.stringify({ dir, processes }, null, 2));
    return p;
  };
  try {
    // Replicas bind port 0 and say where in their log; nginx is configured from what they say.
    const replicaProcs = Array.from({ length: opts.replicas ?? 2 }, (_, i) => record(startDetached(`replica-${i}`, process.execPath, ['bin/deltaserve.js', 'serve', '--deltas-dir', deltasDir], dir, {
      ...process.env, HOST: '127.0.0.1', PORT: '0', DELTASERVE_MODEL: model, LOG_LEVEL: 'info',
    })));
    const replicas = [];
    for (const p of replicaProcs) {
      const url = await waitFor('its "listening" line', p, async () => {
        const line = readFileSync(p.log, 'utf8').split('\n').find((l) => l.includes('"msg":"listening"'));
        return line ? (JSON.parse(line) as { url: string }).url : null;
      }, 60_000);
      replicas.push({ url, pid: p.pid });
    }
    for (const [i, r] of replicas.entries()) await waitFor('/readyz 200', replicaProcs[i], () => ok(`${r.url}/readyz`), 300_000);
    const backbone = ((await (await fetch(`${replicas[0].url}/v1/backbone`)).json()) as { name: string }).name;

    const nginxPort = await freePort();
    const nginxConf = join(dir, 'nginx.conf');
    writeFileSync(nginxConf, fillTemplate(readFileSync(join(DEPLOY, 'local/nginx.conf.template'), 'utf8'), {
      NJS_MODULE, STACK_DIR: dir, TASK_KEY_JS: join(DEPLOY, 'local/task-key.js'), BACKBONE: backbone,
      LISTEN: `127.0.0.1:${nginxPort}`, SERVERS: replicas.map((r) => `    server ${new URL(r.url).host};`).join('\n'),
    }));
    const nginxProc = record(startDetached('nginx', nginx, ['-p', dir, '-c', nginxConf], dir));
    const url = `http://127.0.0.1:${nginxPort}`;
    await waitFor('nginx to proxy /healthz', nginxProc, () => ok(`${url}/healthz`), 20_000);

    const interval = opts.scrapeInterval ?? '5s';
    const rulesFile = join(dir, 'rules.yml');
    writeFileSync(rulesFile, stackRules(opts.alertFor));
    const promConf = join(dir, 'prometheus.yml');
    writeFileSync(promConf, stackPrometheusConfig(replicas.map((r) => new URL(r.url).host), rulesFile, interval));
    const promPort = await freePort();
    const promProc = record(startDetached('prometheus', prometheus, [
      `--config.file=${promConf}`, `--storage.tsdb.path=${join(dir, 'prometheus-data')}`,
      `--web.listen-address=127.0.0.1:${promPort}`, '--log.level=warn',
    ], dir));
    const prometheusUrl = `http://127.0.0.1:${promPort}`;
    await waitFor('Prometheus /-/ready', promProc, () => ok(`${prometheusUrl}/-/ready`), 30_000);

    const state: LocalStackState = { dir, url, prometheusUrl, replicas, deltasDir, backbone, processes };
    writeFileSync(statePath(dir), JSON.stringify(state, null, 2));
    return state;
  } catch (err) {
    await stopProcesses(processes);
    throw err;
  }
}

/** SIGTERM each process (last started first), SIGKILL what is left after `graceMs`. */
async function stopProcesses(processes: StackProcess[], graceMs = 45_000): Promise<string[]> {
  const stopped: string[] = [];
  for (const p of [...processes].reverse()) {
    if (!alive(p)) continue;
    process.kill(p.pid, 'SIGTERM');
    const until = Date.now() + graceMs;
    while (alive(p) && Date.now() < until) await sleep(50);
    if (alive(p)) process.kill(p.pid, 'SIGKILL');
    stopped.push(`${p.name} (pid ${p.pid})`);
  }
  return stopped;
}

/** Stops the stack recorded in `<dir>/state.json`; returns what it stopped. */
export async function stopLocalStack(dir: string): Promise<string[]> {
  const state = readState(resolve(dir));
  if (!state) return [];
  const stopped = await stopProcesses(state.processes);
  rmSync(statePath(resolve(dir)));
  return stopped;
}
