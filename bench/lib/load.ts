/**
 * An HTTP load generator for a real deltaserve process: streamed
 * POST /v1/generate over keep-alive connections, each token's arrival timed.
 * Closed loop: N callers, each sending its next request when the last one
 * ends. Open loop: Poisson arrivals at a set rate, each request sent at its
 * time whatever is still running (the way independent users arrive).
 */
import { Agent, request } from 'node:http';
import { percentile } from './common.js';

export interface LoadRequest {
  /** Index into the scenario's requests; outputs are compared per index. */
  key: string;
  task: string | null;
  prompt: string;
  maxNew: number;
}

export interface RequestTiming {
  key: string;
  task: string | null;
  status: number;
  /** Why it failed (HTTP status, error event, connection), or null. */
  error: string | null;
  /** From sending to the first token, ms. */
  ttftMs: number;
  /** Mean gap between tokens after the first, ms (NaN with one token). */
  tpotMs: number;
  /** Gaps between consecutive tokens, ms. */
  gapsMs: number[];
  e2eMs: number;
  ids: number[];
  /** performance.now() when sent. */
  sentAt: number;
}

export class Client {
  private readonly agent = new Agent({ keepAlive: true, maxSockets: 512 });

  constructor(readonly url: string) {}

  /** One streamed generation; never throws, a failure is in `error`. */
  generate(r: LoadRequest): Promise<RequestTiming> {
    const body = JSON.stringify({ task: r.task, inputs: r.prompt, parameters: { max_new_tokens: r.maxNew }, stream: true });
    const sentAt = performance.now();
    const times: number[] = [];
    const ids: number[] = [];
    const done = (status: number, error: string | null): RequestTiming => {
      const end = performance.now();
      const gapsMs = times.slice(1).map((t, i) => t - times[i]);
      return {
        key: r.key, task: r.task, status, error, sentAt, ids, gapsMs,
        ttftMs: times.length ? times[0] - sentAt : NaN,
        tpotMs: gapsMs.length ? (times.at(-1)! - times[0]) / gapsMs.length : NaN,
        e2eMs: end - sentAt,
      };
    };
    return new Promise((resolve) => {
      const req = request(`${this.url}/v1/generate`, {
        method: 'POST', agent: this.agent, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
      }, (res) => {
        let buf = '';
        let error: string | null = res.statusCode === 200 ? null : `HTTP ${res.statusCode}`;
        let finished = false;
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          const now = performance.now();
          buf += chunk;
          let nl: number;
          while ((nl = buf.indexOf('\n\n')) >= 0) {
            const event = buf.slice(0, nl);
            buf = buf.slice(nl + 2);
            for (const line of event.split('\n')) {
              if (!line.startsWith('data:')) continue;
              const data = line.slice(5).trim();
              try {
                const msg = JSON.parse(data) as { token?: { id: number }; error?: unknown; generated_text?: string | null };
                if (msg.error) error = `error event: ${JSON.stringify(msg.error)}`;
                else if (msg.token) {
                  times.push(now);
                  ids.push(msg.token.id);
                }
                if (typeof msg.generated_text === 'string') finished = true;
              } catch {
                if (res.statusCode === 200) error = `unparsable event: ${data.slice(0, 200)}`;
                else error = `HTTP ${res.statusCode}: ${data.slice(0, 200)}`;
              }
            }
          }
        });
        res.on('end', () => {
          if (res.statusCode !== 200 && buf) error = `HTTP ${res.statusCode}: ${buf.slice(0, 300)}`;
          else if (!error && !finished) error = 'the stream ended without its last event (generated_text and details)';
          resolve(done(res.statusCode ?? 0, error));
        });
        res.on('error', (e) => resolve(done(res.statusCode ?? 0, String(e))));
      });
      req.on('error', (e) => resolve(done(0, String(e))));
      req.end(body);
    });
  }

  async json<T>(method: string, path: string, body?: unknown): Promise<{ status: number; body: T; ms: number }> {
    const t = performance.now();
    const res = await fetch(`${this.url}${path}`, {
      method, headers: body === undefined ? {} : { 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    const ms = performance.now() - t;
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      // Prometheus text, or a plain-text answer: keep the text.
    }
    return { status: res.status, body: parsed as T, ms };
  }

  close(): void {
    this.agent.destroy();
  }
}

export interface LoadRun {
  label: string;
  timings: RequestTiming[];
  wallMs: number;
  /** Offered load: concurrency (closed loop) or requests/s (open loop). */
  offered: number;
  mode: 'closed' | 'open';
}

/** `concurrency` callers share the queue of requests; each sends its next when its last ends. */
export async function closedLoop(client: Client, label: string, reqs: LoadRequest[], concurrency: number): Promise<LoadRun> {
  const timings: RequestTiming[] = [];
  let next = 0;
  const t0 = performance.now();
  await Promise.all(Array.from({ length: Math.min(concurrency, reqs.length) }, async () => {
    while (next < reqs.length) timings.push(await client.generate(reqs[next++]));
  }));
  return { label, timings, wallMs: performance.now() - t0, offered: concurrency, mode: 'closed' };
}

/** Deterministic exponential gaps (a seeded LCG), so every run offers the same arrival pattern. */
export function poissonGapsMs(n: number, ratePerS: number, seed = 12345): number[] {
  let s = seed >>> 0;
  return Array.from({ length: n }, () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    const u = (s + 1) / 4294967297;
    return (-Math.log(u) / ratePerS) * 1000;
  });
}

/** Requests sent at Poisson arrival times at `ratePerS`, whatever is still running. */
export async function openLoop(client: Client, label: string, reqs: LoadRequest[], ratePerS: number): Promise<LoadRun> {
  const gaps = poissonGapsMs(reqs.length, ratePerS);
  const t0 = performance.now();
  let at = 0;
  const pending: Promise<RequestTiming>[] = [];
  for (let i = 0; i < reqs.length; i++) {
    at += gaps[i];
    const wait = t0 + at - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    pending.push(client.generate(reqs[i]));
  }
  const timings = await Promise.all(pending);
  return { label, timings, wallMs: performance.now() - t0, offered: ratePerS, mode: 'open' };
}

/** What a user would judge a run by. */
export interface RunStats {
  requests: number;
  failed: number;
  tokens: number;
  tokensPerS: number;
  requestsPerS: number;
  ttft: Percentiles;
  tpot: Percentiles;
  e2e: Percentiles;
  /** Requests per second that met the SLO (TTFT and TPOT both within it). */
  goodput: number;
}

export interface Percentiles {
  p50: number;
  p90: number;
  p99: number;
}

export interface Slo {
  ttftMs: number;
  tpotMs: number;
}

const pcts = (xs: number[]): Percentiles => {
  const v = xs.filter(Number.isFinite);
  return { p50: percentile(v, 50), p90: percentile(v, 90), p99: percentile(v, 99) };
};

export function stats(run: LoadRun, slo: Slo): RunStats {
  const ok = run.timings.filter((t) => !t.error);
  const tokens = ok.reduce((n, t) => n + t.ids.length, 0);
  const good = ok.filter((t) => t.ttftMs <= slo.ttftMs && (!Number.isFinite(t.tpotMs) || t.tpotMs <= slo.tpotMs)).length;
  return {
    requests: run.timings.length,
    failed: run.timings.length - ok.length,
    tokens,
    tokensPerS: tokens / (run.wallMs / 1000),
    requestsPerS: ok.length / (run.wallMs / 1000),
    ttft: pcts(ok.map((t) => t.ttftMs)),
    tpot: pcts(ok.map((t) => t.tpotMs)),
    e2e: pcts(ok.map((t) => t.e2eMs)),
    goodput: good / (run.wallMs / 1000),
  };
}

/** The failures of a run, and outputs that differ from `reference` (by request key), as messages. */
export function problems(run: LoadRun, reference: Map<string, number[]> | null): string[] {
  const out: string[] = [];
  for (const t of run.timings) {
    if (t.error) out.push(`${run.label}: request ${t.key} (${t.task ?? 'bare'}) failed: ${t.error}`);
    else if (reference) {
      const ref = reference.get(t.key);
      if (!ref) out.push(`${run.label}: request ${t.key} has no reference output`);
      else if (ref.length !== t.ids.length || ref.some((x, i) => x !== t.ids[i])) {
        const at = ref.findIndex((x, i) => x !== t.ids[i]);
        out.push(at >= 0 && at < t.ids.length
          ? `${run.label}: request ${t.key} (${t.task ?? 'bare'}) generated other tokens than its reference (first difference at token ${at})`
          : `${run.label}: request ${t.key} (${t.task ?? 'bare'}) generated ${t.ids.length} tokens, its reference ${ref.length}`);
      }
    }
  }
  return out;
}
