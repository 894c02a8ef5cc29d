/**
 * A server process for the SIGTERM test: the real serve() with its real signal
 * handlers, over the test-only echo generator (slow, so a stream is in flight).
 * Prints its URL on stdout once listening.
 */
import { serve } from '../../src/http/server.js';
import { createLogger } from '../../src/log.js';
import { testApp } from './http-app.js';

const { app, lifecycle } = testApp({ echo: { tokenDelayMs: 25 } });
const running = await serve(app, { host: '127.0.0.1', port: 0, drainSeconds: 10 }, { lifecycle, logger: createLogger('silent') });
process.stdout.write(`${running.url}\n`);
