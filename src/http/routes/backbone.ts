/** GET /v1/backbone: the modules a delta may target, named as PEFT names them. */
import { Router } from 'express';
import type { BackboneInfo } from '../../backbone/types.js';

export function backboneRoutes(backbone: BackboneInfo): Router {
  const body = {
    name: backbone.name,
    family: backbone.family,
    fingerprint: backbone.fingerprint,
    modules: backbone.modules.map((m) => ({ name: m.name, kind: m.kind, in_features: m.inFeatures, out_features: m.outFeatures })),
    default_targets: backbone.defaultTargets,
  };
  const router = Router();
  router.get('/v1/backbone', (_req, res) => {
    res.json(body);
  });
  return router;
}
