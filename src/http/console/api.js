/**
 * The console's only way to the server: the public HTTP API, as any client
 * would call it. Errors come back as ApiError carrying the server's code,
 * message and every listed problem, in either of the server's two error shapes.
 */

const TOKEN_KEY = 'deltaserve.adminToken';
/** A listing that paginates is followed this many pages at most. */
const MAX_PAGES = 100;

/** The admin token lives in this tab's session storage: entered once, gone when the tab closes. */
export const adminToken = {
  /** @returns {string | null} */
  get: () => sessionStorage.getItem(TOKEN_KEY),
  /** @param {string} token */
  set: (token) => sessionStorage.setItem(TOKEN_KEY, token),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

export class ApiError extends Error {
  /**
   * @param {number} status
   * @param {string} code
   * @param {string} message
   * @param {string[]} details every problem the server listed
   */
  constructor(status, code, message, details = []) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }

  /** 401/403 on an admin route: the token is missing or wrong. */
  get isAuth() {
    return this.status === 401 || this.status === 403;
  }
}

/**
 * The server's `{"error":{"code","message","details"?}}`, or OpenAI's
 * `{"error":{"message","type","code"}}`, as an ApiError.
 * @param {number} status
 * @param {unknown} body
 */
function errorFrom(status, body) {
  const e = /** @type {{error?: {code?: unknown, type?: unknown, message?: unknown, details?: unknown}}} */ (body ?? {}).error;
  if (!e || typeof e.message !== 'string') return new ApiError(status, 'http_error', `the server answered ${status}`);
  const code = typeof e.code === 'string' ? e.code : typeof e.type === 'string' ? e.type : 'error';
  const details = Array.isArray(e.details) ? e.details.map(String) : [];
  return new ApiError(status, code, e.message, details);
}

/**
 * @typedef {object} RequestOptions
 * @property {string} [method]
 * @property {unknown} [json] a body sent as JSON
 * @property {FormData} [form] a body sent as multipart/form-data
 * @property {boolean} [admin] send the admin token
 * @property {AbortSignal} [signal]
 */

/**
 * @param {string} path
 * @param {RequestOptions} [opts]
 * @returns {Promise<Response>} an ok response; anything else throws ApiError
 */
export async function request(path, opts = {}) {
  /** @type {Record<string, string>} */
  const headers = { accept: 'application/json' };
  const token = opts.admin ? adminToken.get() : null;
  if (token) headers.authorization = `Bearer ${token}`;
  /** @type {BodyInit | undefined} */
  let body;
  if (opts.json !== undefined) {
    headers['content-type'] = 'application/json';
    body = JSON.stringify(opts.json);
  } else if (opts.form) {
    body = opts.form;
  }
  const res = await fetch(path, { method: opts.method ?? (body ? 'POST' : 'GET'), headers, body, signal: opts.signal });
  if (res.ok) return res;
  let parsed = null;
  try {
    parsed = await res.json();
  } catch {
    // not JSON (a proxy's error page): the status says enough
  }
  throw errorFrom(res.status, parsed);
}

/**
 * @param {string} path
 * @param {RequestOptions} [opts]
 * @returns {Promise<any>}
 */
export async function getJson(path, opts) {
  const res = await request(path, opts);
  return res.status === 204 ? null : res.json();
}

/**
 * Every item of a listing (`{"data":[...]}`), following pages when the server
 * paginates: a `next` link (path or URL), or OpenAI's `has_more` + `?after=<last id>`.
 * @param {string} path
 * @param {RequestOptions} [opts]
 * @returns {Promise<any[]>}
 */
export async function listAll(path, opts) {
  const items = [];
  /** @type {string | null} */
  let next = path;
  for (let page = 0; next && page < MAX_PAGES; page++) {
    const body = await getJson(next, opts);
    const data = Array.isArray(body?.data) ? body.data : [];
    items.push(...data);
    next = nextPage(path, body, data);
  }
  return items;
}

/**
 * @param {string} path
 * @param {any} body
 * @param {any[]} data
 * @returns {string | null}
 */
function nextPage(path, body, data) {
  if (typeof body?.next === 'string' && body.next) {
    const url = new URL(body.next, location.href);
    return url.origin === location.origin ? url.pathname + url.search : null;
  }
  if (body?.has_more === true && data.length) {
    const after = body.last_id ?? data[data.length - 1].id;
    const url = new URL(path, location.href);
    url.searchParams.set('after', String(after));
    return url.pathname + url.search;
  }
  return null;
}

/**
 * The `data:` payloads of a server-sent event stream, parsed as JSON, as they
 * arrive. OpenAI's closing `[DONE]` ends the iteration.
 * @param {Response} res
 * @returns {AsyncGenerator<any>}
 */
export async function* sseEvents(res) {
  if (!res.body) return;
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, '');
      const data = block.split(/\r?\n/).filter((l) => l.startsWith('data:')).map((l) => l.slice(5).replace(/^ /, '')).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      yield JSON.parse(data);
    }
  }
}
