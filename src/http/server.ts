/**
 * Listening and graceful shutdown. On SIGTERM/SIGINT the server keeps its
 * socket open but stops admitting work (readiness 503, generation 503
 * `draining`), so a load balancer moves traffic away while running requests
 * finish; after they do, or after DELTASERVE_DRAIN_SECONDS, it closes and the
 * process exits 0. A second signal cuts the wait short.
 */
import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Express } from 'express';
import type { Config } from '../config.js';
import type { Logger } from '../log.js';

export interface ServeOptions {
  lifecycle: { startDraining(): void };
  logger: Logger;
  /** Runs after the HTTP server closed: stop the engine worker, flush logs. */
  onShutdown?: () => Promise<void> | void;
  /** Default SIGTERM and SIGINT; [] installs no handlers (tests call shutdown()). */
  signals?: NodeJS.Signals[];
  /** Default process.exit. */
  exit?: (code: number) => void;
}

export interface RunningServer {
  server: Server;
  /** `http://host:port`, with the port actually bound. */
  url: string;
  /** Drains, closes, runs onShutdown, exits 0. Idempotent. */
  shutdown(): Promise<void>;
}

export async function serve(
  app: Express,
  config: Pick<Config, 'host' | 'port' | 'drainSeconds'> & Partial<Pick<Config, 'requestTimeoutSeconds'>>,
  opts: ServeOptions,
): Promise<RunningServer> {
  const { logger } = opts;
  const exit = opts.exit ?? ((code: number) => process.exit(code));
  let active = 0;
  let draining = false;
  let wake: (() => void) | null = null;
  // Slow-loris: a connection that dribbles its headers or body is closed once the request timeout passes.
  // The timeout covers receiving the request only (Node clears it when the request is complete), so a
  // long stream is not cut; connections are checked every second so the limit holds to about a second.
  const requestTimeout = (config.requestTimeoutSeconds ?? 300) * 1000;
  const server = createServer({ requestTimeout, headersTimeout: Math.min(requestTimeout, 60_000), connectionsCheckingInterval: 1000 }, (req, res) => {
    active++;
    // Keep-alive clients should reconnect (elsewhere) rather than reuse a socket that is going away.
    if (draining) res.setHeader('Connection', 'close');
    res.on('close', () => {
      active--;
      if (active === 0) wake?.();
    });
    app(req, res);
  });

  server.listen(config.port, config.host);
  await once(server, 'listening');
  const addr = server.address() as AddressInfo;
  const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  const url = `http://${host}:${addr.port}`;
  logger.info({ url }, 'listening');

  let shuttingDown: Promise<void> | null = null;
  let cutShort: (() => void) | null = null;

  async function drain(): Promise<void> {
    draining = true;
    opts.lifecycle.startDraining();
    logger.info({ active, drainSeconds: config.drainSeconds }, 'draining');
    if (active > 0) {
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve) => {
        wake = resolve;
        cutShort = resolve;
        timer = setTimeout(resolve, config.drainSeconds * 1000);
      });
      clearTimeout(timer);
    }
    if (active > 0) logger.warn({ active }, 'drain deadline passed; closing running requests');
    const closed = once(server, 'close');
    server.close();
    server.closeAllConnections();
    await closed;
    await opts.onShutdown?.();
    logger.info('stopped');
    exit(0);
  }

  const shutdown = () => (shuttingDown ??= drain());
  for (const signal of opts.signals ?? ['SIGTERM', 'SIGINT']) {
    process.on(signal, () => {
      if (shuttingDown) {
        logger.warn({ signal }, 'second signal: not waiting for running requests');
        cutShort?.();
      }
      void shutdown();
    });
  }
  return { server, url, shutdown };
}
