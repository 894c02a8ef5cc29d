/** What the HTTP layer hands the scheduler, and what it gets back. */
export interface SamplingParams {
  maxNewTokens: number;
  /** 0 = greedy. */
  temperature: number;
  /** 0 = off. */
  topK: number;
  /** 1 = off. */
  topP: number;
  /** 1 = off. */
  repetitionPenalty: number;
  seed: number | null;
  stop: string[];
}

export type FinishReason = 'length' | 'eos_token' | 'stop_sequence';

export interface GenerateRequest {
  /** null = the bare backbone. */
  task: string | null;
  prompt: string;
  params: SamplingParams;
  /** Aborting frees the request's row within one engine step. */
  signal?: AbortSignal;
  /** Absolute time (ms since epoch) after which the request is cut off with finish_reason length. */
  deadline?: number;
  /** Set: each token comes with its log-probability and this many of the most likely alternatives (0–5). */
  logprobs?: number;
}

export interface TokenEvent {
  id: number;
  /** Text this token adds to the output (may be empty while a multi-byte character is incomplete). */
  text: string;
  /** A special token (eos, bos, …): it adds no text of its own. */
  special: boolean;
  /** When the request asked: the token's log-probability and the alternatives, each with its own text. */
  logprobs?: TokenLogprob & { top: (TokenLogprob & { id: number; special: boolean })[] };
}

/**
 * A token as logprobs show it. `text` is the token decoded alone (special tokens
 * as written, a partial UTF-8 character as U+FFFD): what vLLM and OpenAI show.
 * The log-probability is the model's own, before temperature and the other warpers.
 */
export interface TokenLogprob {
  text: string;
  logprob: number;
}

export interface GenerationResult {
  task: string | null;
  generatedText: string;
  finishReason: FinishReason;
  generatedTokens: number;
  promptTokens: number;
}

/** The scheduler, as the HTTP layer sees it. Errors are thrown as ServeError. */
export interface Generator {
  generate(req: GenerateRequest, onToken?: (t: TokenEvent) => void): Promise<GenerationResult>;
  /** Token count of a prompt, for OpenAI usage and context checks. */
  countTokens(text: string): number;
}
