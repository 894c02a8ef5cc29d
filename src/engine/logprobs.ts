/**
 * A chosen token's log-probability and its most likely alternatives, read off
 * the outputs of the very step that picked it (rewrite/logprobs.ts computes
 * them in the graph). They are the model's own distribution, before
 * temperature, top-k, top-p and the repetition penalty reshape it for
 * sampling: what vLLM returns by default (raw logprobs) and what a reference
 * log-softmax of the logits gives.
 */
export interface TokenLogprobs {
  logprob: number;
  /** The most likely tokens of the step, best first; as many as the request asked (0–5). */
  top: { id: number; logprob: number }[];
}

/** The step's in-graph logprob outputs, [batch, k] and [batch]. */
interface StepLogprobs {
  top: Float32Array;
  ids: BigInt64Array;
  logsumexp: Float32Array;
  k: number;
}

/**
 * Row b's logprobs for `token`, with `n` alternatives. A token among the
 * graph's top k reads its value there; any other (a sampled token further
 * down) is its logit minus log Σ exp(logits), so it needs the step's logits,
 * which a step that samples has fetched anyway.
 */
export function tokenLogprobs(
  step: StepLogprobs, b: number, token: number, n: number, logits: { data: Float32Array; offset(b: number): number } | null,
): TokenLogprobs {
  const top: TokenLogprobs['top'] = [];
  let logprob: number | null = null;
  for (let j = 0; j < step.k; j++) {
    const id = Number(step.ids[b * step.k + j]);
    const value = step.top[b * step.k + j];
    if (j < n) top.push({ id, logprob: value });
    if (id === token) logprob = value;
  }
  // Only a sampled token can miss the top k (the argmax is the top's first, ties included), and sampling
  // fetched the logits. A greedy token missing it means the row's values are not finite (NaN): no number to give.
  logprob ??= logits ? logits.data[logits.offset(b) + token] - step.logsumexp[b] : Number.NaN;
  return { logprob, top };
}
