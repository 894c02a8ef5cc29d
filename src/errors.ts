/**
 * One error type crosses every layer. The HTTP layer turns it into the
 * contract's JSON shape; nothing else needs to know about HTTP status codes.
 */
export type ErrorCode =
  | 'bad_request'
  | 'unauthorized'
  | 'forbidden'
  | 'task_not_found'
  | 'delta_not_found'
  | 'not_found'
  | 'delta_exists'
  | 'pin_budget_exceeded'
  | 'payload_too_large'
  | 'invalid_delta'
  | 'unsupported_delta'
  | 'prompt_too_long'
  | 'invalid_request'
  | 'queue_full'
  | 'not_ready'
  | 'draining'
  | 'timeout'
  | 'cancelled'
  | 'internal_error'
  /** An engine run failed on the batch step that held the request (500): nothing the client did. */
  | 'engine_error';

export class ServeError extends Error {
  constructor(
    readonly status: number,
    readonly code: ErrorCode,
    message: string,
    /** Individual problems, when there are several (a delta refused for many reasons). */
    readonly details?: string[],
    /** Seconds a client should wait before retrying (429/503). */
    readonly retryAfter?: number,
  ) {
    super(message);
    this.name = 'ServeError';
  }
}

export const badRequest = (message: string) => new ServeError(400, 'bad_request', message);
