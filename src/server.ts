/**
 * Process wiring: backbone → delta registry → engine worker → scheduler →
 * HTTP app. `startServices` is what `deltaserve serve` runs and what
 * end-to-end tests start in-process.
 */
import express, { type Express } from 'express';
import { loadBackbone, type Backbone } from './backbone/backbone.js';
import { engineModelSource } from './backbone/engine-model.js';
import { buildEngineGraph } from './backbone/rewrite/index.js';
import { planSites, type SitePlan } from './deltas/kinds/index.js';
import type { DeltaPrefix, DeltaSite } from './deltas/types.js';
import { bankBytesFor } from './engine/bank-bytes.js';
import type { Config } from './config.js';
import { Registry } from './deltas/registry.js';
import { EngineClient } from './engine/engine-client.js';
import { Scheduler } from './engine/scheduler.js';
import { createApp } from './http/app.js';
import { chatTemplateFromTokenizerConfig } from './http/chat-template.js';
import { sendError } from './http/errors.js';
import { sweepUploadTemps } from './http/upload.js';
import { Lifecycle } from './http/lifecycle.js';
import { healthRoutes, liveness } from './http/routes/health.js';
import { serve, type RunningServer } from './http/server.js';
import type { Logger } from './log.js';
import { Metrics } from './metrics.js';
import { tensorByteLength } from './backbone/onnx/proto.js';
import { ServeError } from './errors.js';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

export interface Services {
  backbone: Backbone;
  registry: Registry;
  engine: EngineClient;
  scheduler: Scheduler;
  metrics: Metrics;
  lifecycle: Lifecycle;
  app: Express;
  close(): Promise<void>;
}

export interface ServiceOptions {
  config: Config;
  logger: Logger;
  /** For tests: model cache folder, a real tokenizer for demo:gpt2-small, site plan, remote address. */
  cacheDir?: string;
  tokenizerPath?: string;
  sites?: SitePlan;
  defaultMetrics?: boolean;
  remoteAddress?: Parameters<typeof createApp>[0]['remoteAddress'];
  /** Readiness shared with a server that already listens while the services start (runServer). */
  lifecycle?: Lifecycle;
}

/** Bytes of the backbone's weights, to size the delta cache when it is not configured. */
function weightBytes(backbone: Backbone): number {
  return (backbone.source.model.graph?.initializer ?? []).reduce((n, t) => n + tensorByteLength(t), 0);
}

export function defaultCacheBytes(backbone: Backbone): number {
  return Math.max(256 * 2 ** 20, Math.floor(weightBytes(backbone) / 4));
}

/**
 * KV tokens the running batch may reserve: DELTASERVE_KV_CACHE_BYTES, or every
 * row at full context capped at 4 GiB of cache. Never less than one full context,
 * so any request that fits the backbone can run.
 */
export function kvBudgetTokens(backbone: Backbone, config: Pick<Config, 'maxBatch' | 'kvCacheBytes'>): number {
  const bytesPerToken = 2 * backbone.io.layers * backbone.io.kvHeads * backbone.io.headDim * 4;
  const budget = config.kvCacheBytes ?? Math.min(config.maxBatch * backbone.info.maxPositions * bytesPerToken, 4 * 2 ** 30);
  return Math.max(backbone.info.maxPositions, Math.floor(budget / bytesPerToken));
}

export async function startServices(opts: ServiceOptions): Promise<Services> {
  const { config, logger } = opts;
  const lifecycle = opts.lifecycle ?? new Lifecycle();
  const metrics = new Metrics({ maxTaskLabels: config.metricsTaskLabels, maxLoras: config.maxLoras, defaultMetrics: opts.defaultMetrics });
  const backbone = await loadBackbone({ model: config.model, cacheDir: opts.cacheDir, tokenizerPath: opts.tokenizerPath });
  logger.info({ backbone: backbone.info.name, family: backbone.info.family, modules: backbone.info.modules.length }, 'backbone loaded');

  const sites = opts.sites ?? config.sites;
  const plan = planSites(backbone, sites);
  const graph = buildEngineGraph(backbone, plan);
  const unplaceable = (delta: { sites: DeltaSite[]; prefix?: DeltaPrefix }) => {
    if (delta.prefix?.embeds && !graph.promptEmbeds) {
      return ['this backbone\'s graph has no embedding Gather of input_ids for the rewrite to add prompt_embeds to, so prompt-tuned tasks cannot run on it'];
    }
    const missing = delta.sites.filter((s) => !plan.get(s.module)?.some((site) => site.name === s.site));
    if (!missing.length) return [];
    const sites = [...new Set(missing.map((s) => s.site))];
    return [`this server has no ${sites.join('/')} delta site on ${missing.map((s) => s.module).join(', ')}: ` +
      `restart it with DELTASERVE_SITES naming those modules (e.g. ${sites[0]}:all), or target modules it serves (GET /v1/backbone)`];
  };

  const swept = await sweepUploadTemps(config.uploadTmpDir);
  if (swept) logger.warn({ folders: swept }, 'removed upload folders left by a process that stopped mid-upload');

  const registry = await Registry.open({
    unplaceable,
    dir: config.deltasDir,
    logger,
    backbone: backbone.info,
    cacheBytes: config.cacheBytes ?? defaultCacheBytes(backbone),
    maxRank: config.maxRank,
    hooks: {
      onHit: () => metrics.cacheHit(),
      onMiss: () => metrics.cacheMiss(),
      onEvict: () => metrics.cacheEvict(),
      onBytes: (b) => metrics.setCacheBytes(b),
      onLoadSeconds: (s) => metrics.observeDeltaLoad(s),
      onRegistered: (n) => metrics.setDeltasRegistered(n),
    },
  });

  const engine = await EngineClient.start({
    model: await engineModelSource(backbone, graph.bytes, opts.cacheDir),
    io: backbone.io, sites: graph.sites, eosTokenIds: [...backbone.tokenizer.eosTokenIds], maxPositions: backbone.info.maxPositions,
    ep: config.ep, threads: config.threads || undefined, maxBatch: config.maxBatch, prefillChunkTokens: config.prefillChunkTokens,
  });
  engine.on('error', (message, rowIds) => {
    logger.error({ message, rows: rowIds.length }, 'engine step failed');
    metrics.engineFailure('step', rowIds.length);
  });
  // Each layer left on the Concat fallback says why: it costs an O(context) copy per step.
  for (const l of graph.kvPaths) if (l.path === 'concat') logger.warn({ layer: l.layer, reason: l.reason }, 'attention keeps Concat(past, new) on this layer');
  logger.info({ sites: graph.sites.length, splitAttentionLayers: graph.splitLayers, ep: config.ep }, 'engine ready');

  const scheduler = new Scheduler(engine, backbone.tokenizer, {
    // A delta registered by a replica with other sites can still reach this one through the shared store.
    acquire: async (id) => {
      const lease = await registry.acquire(id);
      const problems = unplaceable(lease.delta);
      if (problems.length) {
        lease.release();
        throw new ServeError(422, 'unsupported_delta', `delta '${id}' cannot run here: ${problems[0]}`);
      }
      return lease;
    },
    exists: async (id) => (await registry.current(id)) !== null,
  }, metrics, {
    maxBatch: config.maxBatch,
    maxQueue: config.maxQueue,
    maxLoras: config.maxLoras,
    kvBudgetTokens: kvBudgetTokens(backbone, config),
    maxPositions: backbone.info.maxPositions,
    backboneName: backbone.info.name,
    bankBudget: { bytes: config.bankBytes, of: (rows) => bankBytesFor(graph.sites, rows) },
  });
  metrics.setBankBudget(config.bankBytes);

  const tokenizerConfig = JSON.parse(readFileSync(join(backbone.source.dir, 'tokenizer_config.json'), 'utf8'));
  const app = createApp({
    generator: scheduler, registry, backbone: backbone.info, metrics, config, readiness: lifecycle,
    chatTemplate: chatTemplateFromTokenizerConfig(tokenizerConfig), logger, remoteAddress: opts.remoteAddress,
    faults: config.faults.includes('engine-step') ? { engineStep: (runs, phase) => engine.injectRunFaults(runs, phase) } : undefined,
  });
  if (config.faults.length) logger.warn({ faults: config.faults }, 'DELTASERVE_FAULTS is set: test-only fault hooks are mounted; never do this in production');

  // One short generation warms ORT's kernels before the server says it is ready.
  await scheduler.generate({ task: null, prompt: 'warm up', params: {
    maxNewTokens: 2, temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: 0, stop: [],
  } });
  lifecycle.markReady();
  return {
    backbone, registry, engine, scheduler, metrics, lifecycle, app,
    close: () => engine.close(),
  };
}

/**
 * Listens first, then loads: while the backbone loads and warms (minutes for a
 * big model), /healthz answers 200, /readyz 503 and everything else 503
 * not_ready, as the contract says; then the real app takes every request.
 */
export async function runServer(config: Config, logger: Logger): Promise<RunningServer> {
  const lifecycle = new Lifecycle();
  let services: Services | null = null;
  const app = express();
  app.disable('x-powered-by');
  app.get('/healthz', liveness);
  app.use((req, res, next) => (services ? services.app(req, res, next) : next()));
  app.use(healthRoutes(lifecycle));
  app.use((req, res) => sendError(req, res, lifecycle.draining()
    ? new ServeError(503, 'draining', 'the server is shutting down; retry on another replica', undefined, 5)
    : new ServeError(503, 'not_ready', 'the backbone is still loading; retry shortly', undefined, 5)));
  const running = await serve(app, config, { lifecycle, logger, onShutdown: () => services?.close() });
  services = await startServices({ config, logger, lifecycle });
  return running;
}
