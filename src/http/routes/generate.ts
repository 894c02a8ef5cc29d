/** POST /v1/generate: TGI-style generation, as JSON or as one SSE event per token. */
import { Router } from 'express';
import type { BackboneInfo } from '../../backbone/types.js';
import type { GenerationResult } from '../../engine/types.js';
import { errorBody, toServeError } from '../errors.js';
import { admit, resolveTask, runGeneration, samplingParams, type GenerationDeps } from '../generation.js';
import type { Readiness } from '../lifecycle.js';
import { generateBody, parseBody } from '../schemas.js';
import { SseStream } from '../sse.js';

/** TGI's default when a client gives no max_new_tokens. */
const DEFAULT_MAX_NEW_TOKENS = 100;

export interface GenerateRouteDeps extends GenerationDeps {
  backbone: BackboneInfo;
  readiness: Readiness;
}

interface TokenEventBody {
  token: { id: number; text: string } | null;
  generated_text: string | null;
}

const details = (r: GenerationResult) => ({
  finish_reason: r.finishReason,
  generated_tokens: r.generatedTokens,
  prompt_tokens: r.promptTokens,
});

export function generateRoutes(deps: GenerateRouteDeps): Router {
  const router = Router();
  router.post('/v1/generate', admit(deps.readiness), async (req, res) => {
    const body = parseBody(generateBody, req.body);
    const task = resolveTask(body.task, deps.backbone, 'task');
    const p = body.parameters ?? {};
    const params = samplingParams({
      maxNewTokens: p.max_new_tokens ?? DEFAULT_MAX_NEW_TOKENS,
      temperature: p.temperature,
      topK: p.top_k,
      topP: p.top_p,
      repetitionPenalty: p.repetition_penalty,
      seed: p.seed,
      stop: p.stop,
    });
    req.log.debug({ task, promptChars: body.inputs.length, params }, 'generate');

    if (!body.stream) {
      const r = await runGeneration(deps, res, { task, prompt: body.inputs, params });
      res.json({ task: r.task, generated_text: r.generatedText, details: details(r) });
      return;
    }

    // The last token event must carry generated_text and details (TGI's framing).
    // The scheduler settles a request in the same turn that delivers its last
    // token, so a token is held only until the event loop turns (setImmediate):
    // if the result arrives first, that token was the last one.
    const sse = new SseStream(res);
    let held: TokenEventBody | null = null;
    let release: NodeJS.Immediate | undefined;
    const sendHeld = () => {
      if (held) sse.send(held);
      held = null;
    };
    try {
      const r = await runGeneration(deps, res, {
        task, prompt: body.inputs, params,
        onToken: (t) => {
          clearImmediate(release);
          sendHeld();
          held = { token: { id: t.id, text: t.text }, generated_text: null };
          release = setImmediate(sendHeld);
        },
      });
      clearImmediate(release);
      const last: TokenEventBody = held ?? { token: null, generated_text: null };
      sse.send({ ...last, generated_text: r.generatedText, details: details(r) });
      sse.end();
    } catch (err) {
      clearImmediate(release);
      if (!sse.started) throw err;
      sse.send(errorBody(toServeError(err), 'native'));
      sse.end();
    }
  });
  return router;
}
