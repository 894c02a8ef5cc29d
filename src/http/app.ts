/**
 * The express application, built from its dependencies only, so that the
 * server and the tests (supertest) run exactly the same thing.
 */
import express, { type Express } from 'express';
import type { BackboneInfo } from '../backbone/types.js';
import type { Config } from '../config.js';
import type { DeltaRegistry } from '../deltas/types.js';
import type { Generator } from '../engine/types.js';
import { createHttpLogger, type Logger } from '../log.js';
import type { Metrics } from '../metrics.js';
import { adminAuth, socketAddress, type RemoteAddress } from './auth.js';
import type { ChatTemplate } from './chat-template.js';
import { ServeError } from '../errors.js';
import { errorHandler, notFoundHandler } from './errors.js';
import { countGenerationResponses } from './generation.js';
import { duplicateKey } from './json-keys.js';
import type { Readiness } from './lifecycle.js';
import { backboneRoutes } from './routes/backbone.js';
import { consoleRoutes } from './routes/console.js';
import { deltaRoutes } from './routes/deltas.js';
import { generateRoutes } from './routes/generate.js';
import { healthRoutes, liveness } from './routes/health.js';
import { metricsRoutes } from './routes/metrics.js';
import { openaiRoutes } from './routes/openai.js';
import { faultRoutes, type FaultHooks } from './routes/faults.js';
import { tgiRoutes } from './routes/tgi.js';

/** JSON.parse keeps the last of two equal keys; a client that sent two meant something we cannot guess. */
function refuseDuplicateKeys(_req: unknown, _res: unknown, buf: Buffer): void {
  const key = duplicateKey(buf.toString('utf8'));
  // body-parser keeps a thrown error's own status, so this reaches the client as this 400.
  if (key !== null) throw new ServeError(400, 'bad_request', `"${key}" appears twice in one object of the request body; send each field once`);
}

/** At most this many files in one delta upload; real deltas have two or three. */
const MAX_UPLOAD_FILES = 16;

export interface AppDeps {
  generator: Generator;
  registry: DeltaRegistry;
  backbone: BackboneInfo;
  metrics: Metrics;
  config: Pick<Config, 'adminToken' | 'importDir' | 'maxBodyBytes' | 'maxUploadBytes' | 'uploadTmpDir' | 'maxBatch' | 'maxQueue'>;
  readiness: Readiness;
  chatTemplate: ChatTemplate;
  logger: Logger;
  /** Test-only fault hooks (DELTASERVE_FAULTS); absent, no fault route exists. */
  faults?: FaultHooks;
  /** Where admin auth reads the peer's address; defaults to the socket. Tests substitute it. */
  remoteAddress?: RemoteAddress;
}

export function createApp(deps: AppDeps): Express {
  const { generator, registry, backbone, metrics, config, readiness, chatTemplate, logger } = deps;
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);
  // Liveness first: a probe answered before logging, body parsing and routing costs
  // a few microseconds, so under load it does not queue behind them (issue 13).
  app.get('/healthz', liveness);
  app.use(createHttpLogger(logger));
  app.use(countGenerationResponses(metrics));
  app.use(express.json({ limit: config.maxBodyBytes, verify: refuseDuplicateKeys }));

  app.use(consoleRoutes());
  app.use(healthRoutes(readiness));
  app.use(metricsRoutes(metrics, registry, readiness));
  app.use(backboneRoutes(backbone, chatTemplate));
  app.use(generateRoutes({ generator, metrics, backbone, readiness }));
  app.use(tgiRoutes({ generator, metrics, backbone, readiness, config }));
  app.use(openaiRoutes({ generator, metrics, backbone, registry, readiness, chatTemplate }));
  const auth = adminAuth(config.adminToken, deps.remoteAddress ?? socketAddress);
  app.use(deltaRoutes({
    registry,
    backbone,
    importDir: config.importDir,
    upload: { maxBytes: config.maxUploadBytes, maxFiles: MAX_UPLOAD_FILES, tmpDir: config.uploadTmpDir },
    auth,
  }));
  if (deps.faults) app.use(faultRoutes(deps.faults, auth));

  app.use(notFoundHandler);
  app.use(errorHandler(logger));
  return app;
}
