/** The routes of the test-only fault hooks (src/faults.ts), mounted only when DELTASERVE_FAULTS names them. Behind admin auth. */
import { Router, type RequestHandler } from 'express';
import { z } from 'zod';
import { parseBody } from '../schemas.js';

export interface FaultHooks {
  /** The engine's next `runs` session runs (of `phase`, or any) fail: onnxruntime rejects a wrong-typed input. */
  engineStep(runs: number, phase: 'prefill' | 'decode' | 'any'): void;
}

const engineStepBody = z.object({
  runs: z.number().int().min(1).max(1000).optional(),
  phase: z.enum(['prefill', 'decode', 'any']).optional(),
}).strict();

export function faultRoutes(hooks: FaultHooks, auth: RequestHandler): Router {
  const router = Router();
  // POST /v1/faults/engine-step {"runs"?: 1, "phase"?: "any"}: 202 {"armed", "phase"}; the next `runs` engine runs of that phase fail.
  router.post('/v1/faults/engine-step', auth, (req, res) => {
    const body = parseBody(engineStepBody, req.body ?? {});
    const armed = { armed: body.runs ?? 1, phase: body.phase ?? 'any' };
    hooks.engineStep(armed.armed, armed.phase);
    res.status(202).json(armed);
  });
  return router;
}
