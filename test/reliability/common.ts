/** What every category of the reliability suite reports, and small shared tools. */
import { fileURLToPath } from 'node:url';

export const FIXTURES = fileURLToPath(new URL('../../../shared/fixtures/', import.meta.url));
export const REPO_FIXTURES = fileURLToPath(new URL('../fixtures/opendelta-kinds/', import.meta.url));

export interface CategoryResult {
  category: string;
  cases: number;
  /** Registered / answered 2xx. */
  accepted: number;
  /** Refused with a 4xx that says why. */
  refused: number;
  /** Anything else: a 5xx, a wrong shape, a hang, an exception that is not a ServeError. */
  failures: string[];
  /** The server process died or stopped answering. */
  crashes: number;
  /** 5xx the suite did not cause: each one is also a failure. */
  fiveXX: number;
  /** 5xx the suite caused on purpose (the engine-step fault hook) and the server answered as it should: not failures. */
  injected5xx: number;
  dataLost: number;
  tempLeft: number;
  /** Mutation or route → cases, for the report. */
  byKind: Record<string, number>;
  /** Extra figures a category measures (ms, %, MB). */
  figures: Record<string, number>;
}

export const newResult = (category: string): CategoryResult => ({
  category, cases: 0, accepted: 0, refused: 0, failures: [], crashes: 0, fiveXX: 0, injected5xx: 0, dataLost: 0, tempLeft: 0, byKind: {}, figures: {},
});

export function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms (a hang)`)), ms))),
  ]);
}

/** Deterministic integers (mulberry32), so a seed replays a run. */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  next(): number {
    this.s = (this.s + 0x6d2b79f5) >>> 0;
    let x = this.s;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  }
  nextInt(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1));
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.nextInt(0, xs.length - 1)];
  }
}

export function percentile(xs: number[], p: number): number {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)];
}
