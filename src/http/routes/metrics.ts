/** GET /metrics: Prometheus text format. */
import { Router } from 'express';
import type { DeltaRegistry } from '../../deltas/types.js';
import type { Metrics } from '../../metrics.js';
import type { Readiness } from '../lifecycle.js';

export function metricsRoutes(metrics: Metrics, registry: DeltaRegistry, readiness: Readiness): Router {
  const router = Router();
  router.get('/metrics', async (req, res) => {
    // Read at scrape time, so an alert sees a drain that never ends (the process stuck past its deadline).
    metrics.setDraining(readiness.draining());
    // The store is the truth and replicas share it, so count it at scrape time.
    try {
      metrics.setDeltasRegistered((await registry.list()).length);
    } catch (err) {
      req.log.warn({ err }, 'could not count the deltas in the store');
    }
    res.type(metrics.contentType).send(await metrics.render());
  });
  return router;
}
