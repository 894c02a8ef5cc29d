/**
 * Request bodies. Unknown fields are dropped rather than refused, because
 * TGI and OpenAI clients send fields we do not use (do_sample, user, ...);
 * fields we cannot honour are refused with a message, below, when set to
 * anything but their neutral value.
 */
import { z } from 'zod';
import { ServeError } from '../errors.js';
import { MAX_TOP_LOGPROBS } from '../backbone/rewrite/logprobs.js';
import { TASK_ID } from '../deltas/store.js';
import { fromZod } from './errors.js';

export { TASK_ID };

export const TASK_ID_RULE = 'a task id: 1-128 characters of letters, digits, ".", "_" or "-", starting with a letter or digit';

export const taskId = z.string().regex(TASK_ID, `expected ${TASK_ID_RULE}`);

const maxTokens = z.number().int().min(1);
const temperature = z.number().min(0).max(100);
const topP = z.number().gt(0).max(1);
const topK = z.number().int().min(0);
const seed = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);
const repetitionPenalty = z.number().gt(0);
export const MAX_STOP_SEQUENCES = 16;
const stopList = z.array(z.string().min(1, 'a stop sequence must not be empty')).max(MAX_STOP_SEQUENCES);

// --- POST /v1/generate, and TGI's POST /generate and /generate_stream -------

const topN = z.number().int().min(0).max(MAX_TOP_LOGPROBS, `at most ${MAX_TOP_LOGPROBS}: deltaserve returns up to ${MAX_TOP_LOGPROBS} alternatives per token`);

export const generateBody = z.object({
  task: z.string().nullish(),
  inputs: z.string(),
  parameters: z
    .object({
      max_new_tokens: maxTokens.nullish(),
      temperature: temperature.nullish(),
      top_k: topK.nullish(),
      top_p: topP.nullish(),
      seed: seed.nullish(),
      stop: stopList.nullish(),
      repetition_penalty: repetitionPenalty.nullish(),
      // TGI's and LoRAX's parameters (added 2026-12).
      adapter_id: z.string().nullish(),
      do_sample: z.boolean().nullish(),
      details: z.boolean().nullish(),
      top_n_tokens: topN.nullish(),
      return_full_text: z.boolean().nullish(),
      // TGI's, refused in the route unless neutral.
      decoder_input_details: z.boolean().nullish(),
      best_of: z.number().int().nullish(),
      truncate: z.number().int().nullish(),
      typical_p: z.number().nullish(),
      watermark: z.boolean().nullish(),
      frequency_penalty: z.number().nullish(),
      grammar: z.unknown().optional(),
    })
    .nullish(),
  stream: z.boolean().nullish(),
});
export type GenerateBody = z.infer<typeof generateBody>;

// --- OpenAI ----------------------------------------------------------------

/** Fields OpenAI defines that we do not implement; refused unless neutral, so nobody gets silently different output. */
const unsupported = {
  frequency_penalty: z.number().nullish(),
  presence_penalty: z.number().nullish(),
  logit_bias: z.record(z.string(), z.number()).nullish(),
};

const openaiCommon = {
  // A task id or the backbone's name; may be left out when adapter_id names the task.
  model: z.string().nullish(),
  /** TGI/LoRAX's adapter selector (@huggingface/inference sends it here, flattened from `parameters`). */
  adapter_id: z.string().nullish(),
  temperature: temperature.nullish(),
  top_p: topP.nullish(),
  seed: seed.nullish(),
  stop: z.union([z.string().min(1), stopList]).nullish(),
  n: z.number().int().nullish(),
  stream: z.boolean().nullish(),
  stream_options: z.object({ include_usage: z.boolean().nullish() }).nullish(),
  // vLLM's extra sampling parameters, which its users send through `extra_body`.
  top_k: topK.nullish(),
  repetition_penalty: repetitionPenalty.nullish(),
  ...unsupported,
};

export const completionBody = z.object({
  ...openaiCommon,
  prompt: z.union([z.string(), z.array(z.string())], { error: 'expected a string or a list of one string' })
    .refine((p) => typeof p === 'string' || p.length === 1, {
      error: (issue) => `deltaserve takes one prompt per request: send a string or a list of one string (this list has ${(issue.input as string[]).length})`,
    }),
  max_tokens: maxTokens.nullish(),
  /** The sampled token's logprob and this many alternatives per token (OpenAI's legacy completions: 0–5). */
  logprobs: topN.nullish(),
  echo: z.boolean().nullish(),
  best_of: z.number().int().nullish(),
  suffix: z.string().nullish(),
});
export type CompletionBody = z.infer<typeof completionBody>;

const textPart = z.object({ type: z.literal('text'), text: z.string() });

export const chatMessage = z.object({
  role: z.enum(['system', 'developer', 'user', 'assistant', 'tool']),
  content: z.union([z.string(), z.array(textPart)]).nullish(),
  name: z.string().nullish(),
});

export const chatBody = z.object({
  ...openaiCommon,
  messages: z.array(chatMessage).min(1),
  max_tokens: maxTokens.nullish(),
  max_completion_tokens: maxTokens.nullish(),
  logprobs: z.boolean().nullish(),
  top_logprobs: topN.nullish(),
  tools: z.array(z.unknown()).nullish(),
  // "none" and "auto" ask for nothing deltaserve does not do; a forced tool call cannot be honoured.
  tool_choice: z.unknown().refine((c) => c == null || c === 'none' || c === 'auto', {
    error: (issue) => `${JSON.stringify(issue.input)} asks for a tool call, but deltaserve does not call tools; leave tool_choice out or send "none"`,
  }).optional(),
  response_format: z.object({ type: z.string() }).nullish(),
});
export type ChatBody = z.infer<typeof chatBody>;

// --- delta admin -----------------------------------------------------------

export const importBody = z.object({ id: taskId, path: z.string().min(1) });

export const loadLoraBody = z.object({
  lora_name: taskId,
  lora_path: z.string().min(1),
  /** vLLM's name for replacing an adapter that is already loaded. */
  load_inplace: z.boolean().nullish(),
});

export const unloadLoraBody = z.object({ lora_name: taskId });

export const replaceQuery = z.object({
  replace: z.enum(['true', 'false', '1', '0'], { message: 'expected true or false' }).optional(),
});

// --- PATCH /v1/deltas/{id} and the listings' pages (added 2026-12) ----------

export const patchDeltaBody = z.object({ pinned: z.boolean({ message: 'expected "pinned": true or false' }) });

export const MAX_PAGE = 1000;

/** OpenAI's list paging: `limit` items with ids after `after`; the answer says `has_more`. */
const wholeFrom1 = `expected a whole number from 1 to ${MAX_PAGE}`;
export const pageQuery = z.object({
  limit: z.coerce.number({ message: wholeFrom1 }).int(wholeFrom1).min(1, wholeFrom1)
    .max(MAX_PAGE, `at most ${MAX_PAGE} per page; follow has_more with after=<last_id> for the rest`)
    .optional(),
  after: taskId.optional(),
});

/** Validates a parsed JSON body; a missing body means the client did not send JSON at all. */
export function parseBody<S extends z.ZodType>(schema: S, body: unknown): z.infer<S> {
  if (body === undefined) {
    throw new ServeError(400, 'bad_request', 'expected a JSON body with "Content-Type: application/json"');
  }
  if (Array.isArray(body)) throw new ServeError(400, 'bad_request', 'the request body must be a JSON object, got an array');
  const parsed = schema.safeParse(body);
  if (!parsed.success) throw fromZod(parsed.error);
  return parsed.data;
}
