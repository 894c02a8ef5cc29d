/**
 * End-to-end helpers: the REAL stack (startServices: backbone, registry, engine
 * worker, scheduler, express app), real listening servers, real child
 * processes, and the in-process Engine as the reference for outputs. Nothing
 * here is a fake.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Express } from 'express';
import request from 'supertest';
import type { Backbone } from '../../src/backbone/backbone.js';
import { buildEngineGraph } from '../../src/backbone/rewrite/index.js';
import { planSites } from '../../src/deltas/kinds/index.js';
import { createSession } from '../../src/backbone/session.js';
import type { BackboneInfo } from '../../src/backbone/types.js';
import { loadConfig, type Config } from '../../src/config.js';
import { Registry } from '../../src/deltas/registry.js';
import { encodeSafetensors, type TensorToWrite } from '../../src/deltas/safetensors.js';
import type { LoadedDelta } from '../../src/deltas/types.js';
import { IncrementalDetokenizer } from '../../src/engine/detokenizer.js';
import { Engine } from '../../src/engine/engine.js';
import type { RemoteAddress } from '../../src/http/auth.js';
import { createLogger, type Logger } from '../../src/log.js';
import { startServices, type Services } from '../../src/server.js';
import { randomFloats } from './deltas.js';

export const REPO = fileURLToPath(new URL('../../', import.meta.url));

export interface Stack {
  services: Services;
  config: Config;
  /** Scratch root: deltas/, cache/, import/ live under it. */
  dir: string;
  deltasDir: string;
  close(): Promise<void>;
}

export interface StackOptions {
  env?: Record<string, string>;
  remoteAddress?: RemoteAddress;
  tokenizerPath?: string;
  /** Share a model cache folder between stacks (it is not removed on close). */
  cacheDir?: string;
  /** Default: silent. */
  logger?: Logger;
}

/** The real services on a demo backbone (default demo:gpt2), in a private scratch folder. */
export async function startStack(opts: StackOptions = {}): Promise<Stack> {
  const dir = await mkdtemp(join(tmpdir(), 'deltaserve-e2e-'));
  const deltasDir = join(dir, 'deltas');
  const config = loadConfig({ DELTASERVE_MODEL: 'demo:gpt2', DELTASERVE_DELTAS_DIR: deltasDir, ...opts.env });
  const services = await startServices({
    config, logger: opts.logger ?? createLogger('silent'), cacheDir: opts.cacheDir ?? join(dir, 'cache'),
    tokenizerPath: opts.tokenizerPath, remoteAddress: opts.remoteAddress, defaultMetrics: false,
  });
  let closed = false;
  return {
    services, config, dir, deltasDir,
    close: async () => {
      if (closed) return;
      closed = true;
      await services.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

export interface Listening {
  url: string;
  server: Server;
  close(): Promise<void>;
}

/** A real HTTP server on 127.0.0.1 for an express app. */
export async function listenOn(app: (req: never, res: never) => void): Promise<Listening> {
  const server = createServer(app as never);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    server,
    close: () => new Promise((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    }),
  };
}

// --- deltas -----------------------------------------------------------------

/** A PEFT LoRA for every module matching `targets` (suffixes), with a B large enough to change greedy output. */
export function peftLora(
  info: BackboneInfo, seed: number,
  opts: { rank?: number; targets?: string[]; bScale?: number; layers?: number[] } = {},
): Record<string, Buffer> {
  const rank = opts.rank ?? 8;
  const targets = opts.targets ?? ['c_attn'];
  const tensors: Record<string, TensorToWrite> = {};
  const mods = info.modules.filter((m) => targets.some((t) => m.name === t || m.name.endsWith(`.${t}`)) &&
    (!opts.layers || (m.layer !== null && opts.layers.includes(m.layer))));
  if (!mods.length) throw new Error(`no module of ${info.name} matches ${targets.join(', ')}`);
  mods.forEach((m, k) => {
    tensors[`base_model.model.${m.name}.lora_A.weight`] = { dtype: 'F32', shape: [rank, m.inFeatures], data: randomFloats(rank * m.inFeatures, seed * 1000 + 2 * k, 1 / Math.sqrt(m.inFeatures)) };
    tensors[`base_model.model.${m.name}.lora_B.weight`] = { dtype: 'F32', shape: [m.outFeatures, rank], data: randomFloats(m.outFeatures * rank, seed * 1000 + 2 * k + 1, opts.bScale ?? 0.5) };
  });
  const config = {
    peft_type: 'LORA', task_type: 'CAUSAL_LM', r: rank, lora_alpha: 2 * rank, target_modules: targets, bias: 'none', fan_in_fan_out: false,
    ...(opts.layers ? { layers_to_transform: opts.layers } : {}),
  };
  return {
    'adapter_config.json': Buffer.from(JSON.stringify(config)),
    'adapter_model.safetensors': Buffer.from(encodeSafetensors(tensors)),
  };
}

/** POST /v1/deltas as multipart over real HTTP, each file a part named by its filename; returns the response. */
export function uploadDelta(baseUrl: string, id: string, files: Record<string, Buffer>, headers: Record<string, string> = {}): Promise<Response> {
  const form = new FormData();
  form.append('id', id);
  for (const [name, content] of Object.entries(files)) form.append('file', new Blob([new Uint8Array(content)]), name);
  return fetch(`${baseUrl}/v1/deltas`, { method: 'POST', body: form, headers });
}

/** Writes delta files into `dir` (created); returns it. */
export async function writeDelta(dir: string, files: Record<string, Buffer>): Promise<string> {
  const { mkdir } = await import('node:fs/promises');
  await mkdir(dir, { recursive: true });
  for (const [name, content] of Object.entries(files)) await writeFile(join(dir, name), content);
  return dir;
}

/**
 * Registers the same files in a private store of its own (not the server's)
 * and loads them: the delta exactly as the engine would get it, without HTTP.
 */
export async function loadDeltaDirectly(backbone: Backbone, id: string, files: Record<string, Buffer>): Promise<LoadedDelta> {
  const dir = await mkdtemp(join(tmpdir(), 'deltaserve-e2e-direct-'));
  try {
    const src = await writeDelta(join(dir, 'src'), files);
    const registry = await Registry.open({ dir: join(dir, 'store'), backbone: backbone.info, cacheBytes: 2 ** 30 });
    await registry.register(id, Object.keys(files).map((name) => ({ name, path: join(src, name) })), { replace: false });
    return await registry.load(id);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

const engines = new WeakMap<Backbone, Promise<Engine>>();

/** Greedy generation on the in-process Engine (as `deltaserve generate` runs it), one row at a time. */
export async function engineGreedy(backbone: Backbone, delta: LoadedDelta | null, prompt: string, maxNewTokens: number): Promise<{ ids: number[]; text: string }> {
  let made = engines.get(backbone);
  if (!made) {
    made = (async () => {
      const graph = buildEngineGraph(backbone, planSites(backbone));
      return new Engine(await createSession(graph.bytes), backbone.io, graph.sites, {
        maxBatch: 1, prefillChunkTokens: 512, eosTokenIds: backbone.tokenizer.eosTokenIds, maxPositions: backbone.info.maxPositions,
      });
    })();
    engines.set(backbone, made);
  }
  const engine = await made;
  const promptIds = backbone.tokenizer.encode(prompt, { addSpecialTokens: true });
  engine.add({ rowId: 1, promptIds, delta, maxNewTokens, sampling: { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null } });
  const detok = new IncrementalDetokenizer(backbone.tokenizer, { promptIds });
  const ids: number[] = [];
  let text = '';
  while (!engine.idle) {
    for (const t of (await engine.step()).tokens) {
      ids.push(t.token);
      text += detok.push(t.token);
    }
  }
  return { ids, text: text + detok.flush() };
}

// --- SSE and streams ----------------------------------------------------------

/** The `data:` payloads of a text/event-stream body, in order. */
export function sseData(body: string): string[] {
  return body.split('\n\n').filter((b) => b.trim() !== '').map((block) => {
    const lines = block.split('\n');
    if (!lines.every((l) => l.startsWith('data: '))) throw new Error(`not an SSE data block: ${JSON.stringify(block)}`);
    return lines.map((l) => l.slice(6)).join('\n');
  });
}

export interface OpenStream {
  status: Promise<number>;
  /** Resolves on the first complete SSE event. */
  firstEvent: Promise<string>;
  /** The whole body once the server ends it. */
  done: Promise<string>;
  abort(): void;
}

/** POSTs a JSON body with fetch and reads the SSE response as it arrives. */
export function openStream(url: string, body: unknown, headers: Record<string, string> = {}): OpenStream {
  const ctl = new AbortController();
  let gotFirst!: (s: string) => void;
  const firstEvent = new Promise<string>((r) => (gotFirst = r));
  const res = fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body), signal: ctl.signal });
  const done = res.then(async (r) => {
    let text = '';
    const decoder = new TextDecoder();
    for await (const chunk of r.body as unknown as AsyncIterable<Uint8Array>) {
      text += decoder.decode(chunk, { stream: true });
      const end = text.indexOf('\n\n');
      if (end >= 0) gotFirst(text.slice(0, end));
    }
    return text + decoder.decode();
  });
  // An aborted stream's rejection is the caller's choice; keep it from being unhandled.
  done.catch(() => {});
  firstEvent.catch(() => {});
  return { status: res.then((r) => r.status), firstEvent, done, abort: () => ctl.abort() };
}

export async function waitFor(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

// --- child processes ------------------------------------------------------------

export interface Child {
  child: ChildProcess;
  /** Everything the child wrote to stdout and stderr so far. */
  output(): string;
  /** Resolves with the `url` of pino's "listening" line. */
  listening: Promise<string>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Signals the child's whole process group (it leads one: npm → sh → node). */
  signal(sig: NodeJS.Signals): void;
  /** SIGKILLs the group if it is still there. */
  kill(): Promise<void>;
}

/** Spawns a command in the repo as the leader of its own process group, with pino logs on stdout. */
export function spawnInRepo(command: string, args: string[], env: Record<string, string>): Child {
  // What a fresh shell would have: none of the server's variables leak in from the test's environment.
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^(DELTASERVE_|HOST$|PORT$|LOG_LEVEL$)/.test(k)));
  const child = spawn(command, args, {
    cwd: REPO, detached: true, stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...clean, LOG_LEVEL: 'info', ...env },
  });
  let out = '';
  let onUrl!: (u: string) => void;
  let onFail!: (e: Error) => void;
  const listening = new Promise<string>((resolve, reject) => {
    onUrl = resolve;
    onFail = reject;
  });
  listening.catch(() => {});
  const scan = (chunk: Buffer) => {
    out += chunk.toString('utf8');
    for (const line of out.split('\n')) {
      if (!line.startsWith('{')) continue;
      try {
        const rec = JSON.parse(line) as { msg?: string; url?: string };
        if (rec.msg === 'listening' && rec.url) onUrl(rec.url.replace('0.0.0.0', '127.0.0.1'));
      } catch { /* a partial line */ }
    }
  };
  child.stdout!.on('data', scan);
  child.stderr!.on('data', (c: Buffer) => (out += c.toString('utf8')));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.on('exit', (code, signal) => {
      onFail(new Error(`the server exited (${code ?? signal}) before listening:\n${out}`));
      resolve({ code, signal });
    });
  });
  const alive = () => child.exitCode === null && child.signalCode === null;
  return {
    child, listening, exited,
    output: () => out,
    signal: (sig) => {
      if (alive()) process.kill(-child.pid!, sig);
    },
    kill: async () => {
      if (!alive()) return;
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch { /* gone meanwhile */ }
      await exited;
    },
  };
}

/** A scratch folder that a test removes at its end. */
export async function scratch(label: string): Promise<{ dir: string; remove(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), `deltaserve-e2e-${label}-`));
  return { dir, remove: () => rm(dir, { recursive: true, force: true }) };
}

/** Polls until `url` answers; returns every status seen (connection refusals are not statuses). */
export async function pollUntil(url: string, done: (status: number) => boolean, timeoutMs = 60_000): Promise<number[]> {
  const seen: number[] = [];
  const until = Date.now() + timeoutMs;
  for (;;) {
    try {
      const r = await fetch(url);
      await r.arrayBuffer();
      seen.push(r.status);
      if (done(r.status)) return seen;
    } catch { /* not listening yet */ }
    if (Date.now() > until) throw new Error(`timed out polling ${url}; statuses seen: ${seen.join(',')}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The token ids one greedy streamed /v1/generate returns (eos, when generated, is the last). */
export async function streamedIds(app: Express, task: string | null, text: string, maxNewTokens: number): Promise<number[]> {
  const res = await request(app).post('/v1/generate')
    .send({ task, inputs: text, parameters: { max_new_tokens: maxNewTokens }, stream: true })
    .buffer(true).parse((r, cb) => { let s = ''; r.on('data', (c: Buffer) => (s += c)); r.on('end', () => cb(null, s)); });
  assert.equal(res.status, 200, String(res.body));
  return sseData(res.body as string).map((d) => JSON.parse(d)).filter((e) => e.token).map((e) => e.token.id as number);
}

/** Registers the delta in `dir` (every file in it, as a multipart upload) under `id`. */
export async function uploadFolder(app: Express, id: string, dir: string): Promise<request.Response> {
  let req = request(app).post('/v1/deltas').field('id', id);
  for (const name of await readdir(dir)) req = req.attach('files', await readFile(join(dir, name)), name);
  return req;
}
