/** GET /metrics: Prometheus text format. */
import { Router } from 'express';
import type { DeltaRegistry } from '../../deltas/types.js';
import type { Metrics } from '../../metrics.js';
import type { Readiness } from '../lifecycle.js';

export function metricsRoutes(metrics: Metrics, registry: DeltaRegistry, readiness: Readiness): Router {
  const router = Router();
  router.get('/metrics', async (_req, res) => {
    // Read at scrape time, so an alert sees a drain that never ends (the process stuck past its deadline).
    metrics.setDraining(readiness.draining());
    // From the registry's index: a scrape costs the same at 10 or 10,000 deltas (other replicas' changes arrive within a second).
    metrics.setDeltasRegistered(registry.count());
    res.type(metrics.contentType).send(await metrics.render());
  });
  return router;
}
