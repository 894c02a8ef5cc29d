/** POST /v1/generate: TGI-style generation, as JSON or as one SSE event per token. */
import { Router } from 'express';
import type { BackboneInfo } from '../../backbone/types.js';
import type { GenerationResult } from '../../engine/types.js';
import { admit, type GenerationDeps } from '../generation.js';
import type { Readiness } from '../lifecycle.js';
import { nativeRun, outputText, respondNative, tgiToken, tgiTopTokens, usedSeed, type NativeDialect, type NativeRun } from '../native-generation.js';
import { generateBody, parseBody } from '../schemas.js';

export interface GenerateRouteDeps extends GenerationDeps {
  backbone: BackboneInfo;
  readiness: Readiness;
}

/** The contract's details; with TGI's `details` (or top_n_tokens) asked, TGI's token details as well. */
function details(run: NativeRun, r: GenerationResult) {
  return {
    finish_reason: r.finishReason,
    generated_tokens: r.generatedTokens,
    prompt_tokens: r.promptTokens,
    ...(run.details ? { seed: usedSeed(run) } : {}),
  };
}

const v1: NativeDialect = {
  // TGI's default before it became "until the context is full".
  defaultMaxNewTokens: 100,
  // The contract: temperature 0 or absent is greedy (unless do_sample asks for sampling).
  samplesByDefault: () => false,
  json: (run, r, tokens) => ({
    task: r.task,
    generated_text: outputText(run, r),
    details: {
      ...details(run, r),
      ...(run.logprobs !== undefined ? { tokens: tokens.map(tgiToken) } : {}),
      ...(run.topN > 0 ? { top_tokens: tokens.map(tgiTopTokens) } : {}),
    },
  }),
  event: (run, t, _index, r) => ({
    token: t && (run.logprobs !== undefined ? tgiToken(t) : { id: t.id, text: t.text }),
    ...(t && run.topN > 0 ? { top_tokens: tgiTopTokens(t) } : {}),
    generated_text: r && outputText(run, r),
    ...(r ? { details: details(run, r) } : {}),
  }),
};

export function generateRoutes(deps: GenerateRouteDeps): Router {
  const router = Router();
  router.post('/v1/generate', admit(deps.readiness), async (req, res) => {
    const body = parseBody(generateBody, req.body);
    const run = nativeRun(body, deps.backbone, v1);
    req.log.debug({ task: run.task, promptChars: run.prompt.length, params: run.params }, 'generate');
    await respondNative(deps, res, run, v1, body.stream === true);
  });
  return router;
}
