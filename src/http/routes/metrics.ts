/** GET /metrics: Prometheus text format. */
import { Router } from 'express';
import type { DeltaRegistry } from '../../deltas/types.js';
import type { Metrics } from '../../metrics.js';

export function metricsRoutes(metrics: Metrics, registry: DeltaRegistry): Router {
  const router = Router();
  router.get('/metrics', async (req, res) => {
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
