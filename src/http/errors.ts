/**
 * Every failure leaves the server in one of two JSON shapes: the contract's
 * `{"error":{"code","message"[,"details"]}}`, or OpenAI's
 * `{"error":{"message","type","param","code"}}` on the OpenAI routes, so the
 * official clients raise their own typed errors. Never a stack trace.
 */
import type { ErrorRequestHandler, Request, RequestHandler, Response } from 'express';
import { z } from 'zod';
import { ServeError } from '../errors.js';
import type { Logger } from '../log.js';

export type ErrorStyle = 'native' | 'openai';

const OPENAI_PATHS = /^\/v1\/(completions|chat\/completions|models(\/.*)?|load_lora_adapter|unload_lora_adapter)$/;

export function errorStyleFor(path: string): ErrorStyle {
  return OPENAI_PATHS.test(path) ? 'openai' : 'native';
}

/** Names the offending field and what was expected: `parameters.top_p: expected a number ≤ 1`. */
export function fromZod(error: z.ZodError): ServeError {
  const problems = error.issues.map((issue) => {
    const where = issue.path.length ? issue.path.map(String).join('.') : 'body';
    return `${where}: ${issue.message}`;
  });
  return new ServeError(400, 'bad_request', problems.join('; '), problems.length > 1 ? problems : undefined);
}

interface HttpParserError {
  type?: string;
  status: number;
  limit?: number;
  /** The raw body, on a parse failure. */
  body?: string;
  /** zlib's code when a Content-Encoding did not decode (Z_DATA_ERROR …). */
  code?: string;
  message: string;
}

/** body-parser's and zlib's errors: a 4xx status, set because the client sent something unreadable. */
const isClientBodyError = (err: unknown): err is HttpParserError =>
  typeof err === 'object' && err !== null && typeof (err as { status?: unknown }).status === 'number' &&
  (err as { status: number }).status >= 400 && (err as { status: number }).status < 500;

function jsonKind(body: string | undefined): string | null {
  try {
    const v: unknown = JSON.parse(body ?? '');
    return v === null ? 'null' : Array.isArray(v) ? 'an array' : typeof v === 'string' ? 'a string' : typeof v === 'number' ? 'a number' : typeof v === 'boolean' ? 'a boolean' : null;
  } catch {
    return null;
  }
}

/**
 * Turns whatever was thrown into a ServeError; anything unexpected becomes a bare 500.
 * `encoding`: the request's Content-Encoding, to name it when the body did not decode.
 */
export function toServeError(err: unknown, encoding?: string): ServeError {
  if (err instanceof ServeError) return err;
  if (err instanceof z.ZodError) return fromZod(err);
  if (isClientBodyError(err)) {
    if (err.type === 'entity.too.large') {
      return new ServeError(413, 'payload_too_large', `request body is larger than the limit of ${err.limit} bytes (DELTASERVE_MAX_BODY_BYTES)`);
    }
    if (err.type === 'entity.parse.failed') {
      // Strict JSON parsing refuses valid JSON that is not an object or array; say which it was.
      const kind = jsonKind(err.body);
      return new ServeError(400, 'bad_request', kind ? `the request body must be a JSON object, got ${kind}` : 'request body is not valid JSON');
    }
    if (err.code?.startsWith('Z_')) {
      return new ServeError(400, 'bad_request',
        `the body is not what its Content-Encoding: ${encoding ?? '?'} header says: it could not be decompressed (${err.message}); ` +
        'send it uncompressed without that header, or compressed as declared');
    }
    if (err.type === 'encoding.unsupported') return new ServeError(415 as number, 'bad_request', err.message);
    return new ServeError(400, 'bad_request', `request body could not be read (${err.type ?? err.message})`);
  }
  return new ServeError(500, 'internal_error', 'internal error; the server log has the details under this request id');
}

const OPENAI_TYPES: Record<number, string> = {
  401: 'authentication_error',
  403: 'permission_error',
  404: 'not_found_error',
  429: 'rate_limit_error',
};

function openaiBody(e: ServeError) {
  const type = OPENAI_TYPES[e.status] ?? (e.status >= 500 ? 'server_error' : 'invalid_request_error');
  // OpenAI clients recognise `model_not_found`; on these routes a task is a model.
  const code = e.code === 'task_not_found' ? 'model_not_found' : e.code;
  const message = e.details?.length && !e.message.includes(e.details[0]) ? `${e.message}: ${e.details.join('; ')}` : e.message;
  return { error: { message, type, param: null, code } };
}

function nativeBody(e: ServeError) {
  return { error: { code: e.code, message: e.message, ...(e.details?.length ? { details: e.details } : {}) } };
}

export function errorBody(e: ServeError, style: ErrorStyle) {
  return style === 'openai' ? openaiBody(e) : nativeBody(e);
}

export function sendError(req: Request, res: Response, e: ServeError): void {
  if (e.retryAfter !== undefined) res.setHeader('Retry-After', String(Math.ceil(e.retryAfter)));
  if (e.status === 401) res.setHeader('WWW-Authenticate', 'Bearer');
  res.status(e.status).json(errorBody(e, errorStyleFor(req.path)));
}

export const notFoundHandler: RequestHandler = (req, _res, next) => {
  next(new ServeError(404, 'not_found', `no route ${req.method} ${req.path}; the README lists the endpoints`));
};

export function errorHandler(logger: Logger): ErrorRequestHandler {
  return (err, req, res, _next) => {
    const e = toServeError(err, req.headers['content-encoding']);
    if (e.status >= 500) (req.log ?? logger).error({ err }, 'request failed');
    if (res.headersSent) {
      // A stream already started: its route owns the framing, so just end it.
      res.end();
      return;
    }
    sendError(req, res, e);
  };
}
