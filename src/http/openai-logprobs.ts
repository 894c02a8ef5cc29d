/**
 * OpenAI's two logprobs shapes, from the tokens' logprobs: the legacy
 * completions' parallel lists and chat's list of entries with bytes.
 */
import type { TokenEvent, TokenLogprob } from '../engine/types.js';

type WithLogprobs = TokenEvent & { logprobs: NonNullable<TokenEvent['logprobs']> };

/** Characters as Python counts them (code points), like OpenAI's text_offset. */
const chars = (text: string) => [...text].length;

/**
 * Completions: `top_logprobs` maps each alternative's text to its logprob, with
 * the sampled token always among them (so up to n + 1 entries, as OpenAI says).
 * `offset`: characters of the completion before the first of these tokens.
 */
export function completionLogprobs(tokens: TokenEvent[], offset: number) {
  const out = { tokens: [] as string[], token_logprobs: [] as number[], top_logprobs: [] as Record<string, number>[], text_offset: [] as number[] };
  let at = offset;
  for (const t of tokens as WithLogprobs[]) {
    const lp = t.logprobs;
    out.tokens.push(lp.text);
    out.token_logprobs.push(lp.logprob);
    out.top_logprobs.push(Object.fromEntries([...lp.top.map((a) => [a.text, a.logprob]), [lp.text, lp.logprob]]));
    out.text_offset.push(at);
    at += chars(t.text);
  }
  return out;
}

/** The character count that completionLogprobs' next call starts from. */
export const textLength = chars;

const chatEntry = (x: TokenLogprob) => ({ token: x.text, logprob: x.logprob, bytes: [...Buffer.from(x.text, 'utf8')] });

/** Chat: one entry per token with its UTF-8 bytes, and the n alternatives in the same form. */
export function chatLogprobs(tokens: TokenEvent[]) {
  return {
    content: (tokens as WithLogprobs[]).map((t) => ({ ...chatEntry(t.logprobs), top_logprobs: t.logprobs.top.map(chatEntry) })),
    refusal: null,
  };
}
