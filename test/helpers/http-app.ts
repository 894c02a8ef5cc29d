/** Builds the real createApp() over the test-only fakes, and real listening servers for it. */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Express } from 'express';
import { loadConfig, type Config } from '../../src/config.js';
import { createApp } from '../../src/http/app.js';
import type { RemoteAddress } from '../../src/http/auth.js';
import { createChatTemplate, type ChatTemplate } from '../../src/http/chat-template.js';
import { Lifecycle } from '../../src/http/lifecycle.js';
import { createLogger, type Logger } from '../../src/log.js';
import { Metrics } from '../../src/metrics.js';
import { EchoGenerator, MemoryRegistry, TEST_BACKBONE, type EchoOptions } from './http-fakes.js';

export interface TestAppOptions {
  env?: NodeJS.ProcessEnv;
  remoteAddress?: RemoteAddress;
  ready?: boolean;
  echo?: EchoOptions;
  chatTemplate?: ChatTemplate;
  logger?: Logger;
}

export interface TestApp {
  app: Express;
  config: Config;
  generator: EchoGenerator;
  registry: MemoryRegistry;
  metrics: Metrics;
  lifecycle: Lifecycle;
}

export function testApp(opts: TestAppOptions = {}): TestApp {
  const config = loadConfig(opts.env ?? {});
  const registry = new MemoryRegistry();
  const generator = new EchoGenerator(registry, opts.echo);
  const metrics = new Metrics({ maxTaskLabels: config.metricsTaskLabels, maxLoras: config.maxLoras });
  const lifecycle = new Lifecycle();
  if (opts.ready ?? true) lifecycle.markReady();
  const app = createApp({
    generator,
    registry,
    backbone: TEST_BACKBONE,
    metrics,
    config,
    readiness: lifecycle,
    chatTemplate: opts.chatTemplate ?? createChatTemplate(),
    logger: opts.logger ?? createLogger('silent'),
    remoteAddress: opts.remoteAddress,
  });
  return { app, config, generator, registry, metrics, lifecycle };
}

export interface Listening {
  url: string;
  server: Server;
  close(): Promise<void>;
}

export async function listen(app: Express, host = '127.0.0.1'): Promise<Listening> {
  const server = createServer(app);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, host, resolve);
  });
  const { port } = server.address() as AddressInfo;
  const h = host.includes(':') ? `[${host}]` : host;
  return {
    url: `http://${h}:${port}`,
    server,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** Parses a text/event-stream body into its `data:` payloads. */
export function sseData(body: string): string[] {
  return body
    .split('\n\n')
    .filter((block) => block.trim() !== '')
    .map((block) => {
      const lines = block.split('\n');
      if (!lines.every((l) => l.startsWith('data: '))) throw new Error(`not an SSE data block: ${JSON.stringify(block)}`);
      return lines.map((l) => l.slice(6)).join('\n');
    });
}
