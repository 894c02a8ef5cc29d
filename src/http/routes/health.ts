/** Liveness and readiness probes, for Kubernetes and load balancers. */
import { Router, type RequestHandler } from 'express';
import { requestId } from '../../log.js';
import type { Readiness } from '../lifecycle.js';

const OK = JSON.stringify({ status: 'ok' });

/** 200 while the process lives. The app mounts it ahead of every middleware, so it echoes the request id itself. */
export const liveness: RequestHandler = (req, res) => {
  requestId(req, res);
  res.setHeader('content-type', 'application/json; charset=utf-8');
  res.end(OK);
};

export function healthRoutes(readiness: Readiness): Router {
  const router = Router();
  router.get('/readyz', (_req, res) => {
    if (readiness.ready()) return void res.json({ status: 'ready' });
    res.status(503).json({ status: readiness.draining() ? 'draining' : 'starting' });
  });
  return router;
}
