/** Liveness and readiness probes, for Kubernetes and load balancers. */
import { Router } from 'express';
import type { Readiness } from '../lifecycle.js';

export function healthRoutes(readiness: Readiness): Router {
  const router = Router();
  router.get('/healthz', (_req, res) => {
    res.json({ status: 'ok' });
  });
  router.get('/readyz', (_req, res) => {
    if (readiness.ready()) return void res.json({ status: 'ready' });
    res.status(503).json({ status: readiness.draining() ? 'draining' : 'starting' });
  });
  return router;
}
