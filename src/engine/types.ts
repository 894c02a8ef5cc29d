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
}

export interface TokenEvent {
  id: number;
  /** Text this token adds to the output (may be empty while a multi-byte character is incomplete). */
  text: string;
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
