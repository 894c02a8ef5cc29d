/**
 * A real deltaserve process (`tsx src/cli.ts serve`) for the HTTP sections:
 * its own store, cache budget and port, timed from spawn to /readyz, its RSS
 * read from /proc. Deltas are registered over HTTP, the way users do.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { demoSpec } from '../../src/backbone/demo/spec.js';
import { encodeSafetensors, type TensorToWrite } from '../../src/deltas/safetensors.js';
import { rand, sleep } from './common.js';
import { Client } from './load.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

export interface ServerProcess {
  url: string;
  client: Client;
  child: ChildProcess;
  deltasDir: string;
  /** Spawn to /readyz answering 200, ms. */
  startupMs: number;
  rssBytes(): number;
  /** The process's log (stderr and stdout), for a failure's message. */
  log(): string;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

export async function makeScratch(label: string): Promise<{ dir: string; remove(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), `deltaserve-bench-${label}-`));
  return { dir, remove: () => rm(dir, { recursive: true, force: true }) };
}

/** Starts a server on `model` (the bench's, ctx.model) with `env` on top of the bench's defaults; waits until it is ready. */
export async function startServer(opts: { model: string; deltasDir: string; cacheDir: string; env?: Record<string, string>; timeoutMs?: number }): Promise<ServerProcess> {
  const port = await freePort();
  const t0 = performance.now();
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli.ts', 'serve'], {
    cwd: ROOT,
    env: {
      ...process.env, HOST: '127.0.0.1', PORT: String(port), DELTASERVE_MODEL: opts.model, DELTASERVE_DELTAS_DIR: opts.deltasDir,
      DELTASERVE_CACHE_DIR: opts.cacheDir, LOG_LEVEL: 'warn', ...opts.env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  const keep = (b: Buffer) => {
    log = (log + b.toString()).slice(-20_000);
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  let exited: number | null = null;
  child.on('exit', (code) => {
    exited = code ?? -1;
  });
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + (opts.timeoutMs ?? 300_000);
  for (;;) {
    if (exited !== null) throw new Error(`the server exited with ${exited} before it was ready:\n${log}`);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`the server was not ready within ${(opts.timeoutMs ?? 300_000) / 1000} s:\n${log}`);
    }
    try {
      const r = await fetch(`${url}/readyz`);
      await r.text();
      if (r.status === 200) break;
    } catch {
      // not listening yet
    }
    await sleep(50);
  }
  const startupMs = performance.now() - t0;
  const client = new Client(url);
  return {
    url, client, child, deltasDir: opts.deltasDir, startupMs,
    rssBytes() {
      const m = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'));
      return m ? Number(m[1]) * 1024 : NaN;
    },
    log: () => log,
    async stop() {
      client.close();
      if (exited !== null) return;
      const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
      await gone;
      clearTimeout(timer);
    },
  };
}

export interface ModuleInfo {
  name: string;
  in_features: number;
  out_features: number;
}

/** A PEFT LoRA on every c_attn as a user brings it (adapter_config.json + adapter_model.safetensors); `k` seeds its weights. */
export function peftLora(modules: ModuleInfo[], k: number, rank: number): Record<string, Uint8Array> {
  const tensors: Record<string, TensorToWrite> = {};
  modules.filter((m) => m.name.endsWith('.c_attn')).forEach((m, j) => {
    const seed = 1_000_003 * (k + 1) + 97 * j;
    tensors[`base_model.model.${m.name}.lora_A.weight`] = { dtype: 'F32', shape: [rank, m.in_features], data: rand(rank * m.in_features, seed, 1 / Math.sqrt(m.in_features)) };
    tensors[`base_model.model.${m.name}.lora_B.weight`] = { dtype: 'F32', shape: [m.out_features, rank], data: rand(m.out_features * rank, seed + 1, 0.2) };
  });
  const config = { peft_type: 'LORA', task_type: 'CAUSAL_LM', r: rank, lora_alpha: 2 * rank, target_modules: ['c_attn'], bias: 'none', fan_in_fan_out: true };
  return { 'adapter_config.json': Buffer.from(JSON.stringify(config, null, 2)), 'adapter_model.safetensors': encodeSafetensors(tensors) };
}

/** POST /v1/deltas as multipart, the way the console and curl do it; returns the ms it took. Throws on anything but 201. */
export async function uploadDelta(url: string, id: string, files: Record<string, Uint8Array>, replace = false): Promise<number> {
  const form = new FormData();
  form.append('id', id);
  for (const [name, bytes] of Object.entries(files)) form.append('file', new Blob([new Uint8Array(bytes)]), name);
  const t = performance.now();
  const res = await fetch(`${url}/v1/deltas${replace ? '?replace=true' : ''}`, { method: 'POST', body: form });
  const text = await res.text();
  if (res.status !== 201) throw new Error(`registering ${id} answered ${res.status}: ${text}`);
  return performance.now() - t;
}

export async function backboneModules(client: Client): Promise<ModuleInfo[]> {
  const r = await client.json<{ modules: ModuleInfo[] }>('GET', '/v1/backbone');
  if (r.status !== 200) throw new Error(`GET /v1/backbone answered ${r.status}`);
  return r.body.modules;
}

/** Bytes the delta cache charges for one rank-`rank` LoRA (peftLora's) on every c_attn (hidden → 3·hidden) of the GPT-2 demo `model`. */
export function loraBytes(model: string, rank: number): number {
  const spec = demoSpec(model);
  if (!spec || spec.family !== 'gpt2') throw new Error(`loraBytes: ${model} is not a GPT-2 demo`);
  return spec.layers * (spec.hidden * rank + rank * 3 * spec.hidden) * 4;
}

/**
 * A GET's status and body, retried once when the kept-alive connection it was
 * sent on had just been closed by the server (its keep-alive timeout racing
 * our reuse; seen on a saturated machine): a GET is idempotent, so a retry is safe.
 */
export async function getText(url: string): Promise<{ status: number; text: string }> {
  for (let attempt = 0; ; attempt++) {
    try {
      const r = await fetch(url);
      return { status: r.status, text: await r.text() };
    } catch (err) {
      const code = (err as { cause?: { code?: string } }).cause?.code;
      if (attempt > 0 || (code !== 'UND_ERR_SOCKET' && code !== 'ECONNRESET')) throw err;
    }
  }
}

/** A gauge's value from Prometheus text. */
export function gauge(text: string, name: string): number {
  const m = new RegExp(`^${name} ([0-9.e+-]+)$`, 'm').exec(text);
  return m ? Number(m[1]) : NaN;
}
