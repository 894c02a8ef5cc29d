/**
 * Text Generation Inference's own routes, for the clients written against
 * TGI and LoRAX: POST /generate (JSON), POST /generate_stream (SSE), POST /
 * (either, by `stream`, as TGI's compat route) and GET /info. The task is
 * `parameters.adapter_id`, as LoRAX and TGI's multi-LoRA select adapters;
 * without one the bare backbone runs, as TGI runs its base model.
 */
import { readFileSync } from 'node:fs';
import { Router, type Request, type Response } from 'express';
import type { BackboneInfo } from '../../backbone/types.js';
import type { Config } from '../../config.js';
import type { GenerationResult } from '../../engine/types.js';
import { admit, type GenerationDeps } from '../generation.js';
import type { Readiness } from '../lifecycle.js';
import { nativeRun, outputText, respondNative, tgiToken, tgiTopTokens, usedSeed, type NativeDialect, type NativeRun } from '../native-generation.js';
import { generateBody, MAX_STOP_SEQUENCES, parseBody } from '../schemas.js';

export interface TgiRouteDeps extends GenerationDeps {
  backbone: BackboneInfo;
  readiness: Readiness;
  config: Pick<Config, 'maxBatch' | 'maxQueue'>;
}

const VERSION = (JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string }).version;

const finish = (run: NativeRun, r: GenerationResult) => ({
  finish_reason: r.finishReason,
  generated_tokens: r.generatedTokens,
  seed: usedSeed(run),
});

function tgiDialect(backbone: BackboneInfo): NativeDialect {
  return {
    // TGI's default: until the context is full (the scheduler cuts it to what the prompt leaves).
    defaultMaxNewTokens: backbone.maxPositions,
    // TGI samples when any warper is set, at temperature 1 unless told otherwise.
    samplesByDefault: (p) => p.top_k != null || p.top_p != null,
    json: (run, r, tokens) => ({
      generated_text: outputText(run, r),
      ...(run.details ? {
        details: {
          ...finish(run, r),
          // The prompt's tokens: TGI fills them only with decoder_input_details, which deltaserve refuses.
          prefill: [],
          tokens: tokens.map(tgiToken),
          ...(run.topN > 0 ? { top_tokens: tokens.map(tgiTopTokens) } : {}),
        },
      } : {}),
    }),
    event: (run, t, index, r) => ({
      index,
      token: t && tgiToken(t),
      ...(t && run.topN > 0 ? { top_tokens: tgiTopTokens(t) } : {}),
      generated_text: r && outputText(run, r),
      details: r && run.details ? { ...finish(run, r), input_length: r.promptTokens } : null,
    }),
  };
}

export function tgiRoutes(deps: TgiRouteDeps): Router {
  const router = Router();
  const gate = admit(deps.readiness);
  const dialect = tgiDialect(deps.backbone);
  const generate = (stream: (body: { stream?: boolean | null }) => boolean) => async (req: Request, res: Response) => {
    const body = parseBody(generateBody, req.body);
    const run = nativeRun(body, deps.backbone, dialect);
    req.log.debug({ task: run.task, promptChars: run.prompt.length, params: run.params }, 'tgi generate');
    await respondNative(deps, res, run, dialect, stream(body));
  };
  router.post('/generate', gate, generate(() => false));
  router.post('/generate_stream', gate, generate(() => true));
  router.post('/', gate, generate((body) => body.stream === true));

  const { maxPositions } = deps.backbone;
  const info = {
    model_id: deps.backbone.name,
    model_sha: null,
    model_pipeline_tag: 'text-generation',
    max_concurrent_requests: deps.config.maxBatch + deps.config.maxQueue,
    max_best_of: 1,
    max_stop_sequences: MAX_STOP_SEQUENCES,
    max_input_tokens: maxPositions - 1,
    // The older name, which LoRAX still uses.
    max_input_length: maxPositions - 1,
    max_total_tokens: maxPositions,
    max_batch_size: deps.config.maxBatch,
    validation_workers: 1,
    max_client_batch_size: 1,
    router: 'deltaserve',
    version: VERSION,
    sha: null,
    docker_label: null,
  };
  router.get('/info', (_req, res) => {
    res.json(info);
  });
  return router;
}
