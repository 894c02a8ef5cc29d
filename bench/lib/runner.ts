/**
 * The bench's sections and what they share. A section is a file in
 * bench/sections/ exporting `{ name, run }`; `run` returns its tables and
 * goals, or throws. A section that throws prints no figures, and a run with
 * any failed section prints none at all and exits non-zero: figures of a run
 * whose requests failed, or whose outputs differ from the reference, are
 * not figures anyone should quote.
 */
import type { Backbone } from '../../src/backbone/backbone.js';
import { loadBackbone } from '../../src/backbone/backbone.js';

export interface Goal {
  what: string;
  measured: string;
  met: string;
}

/** One `## title` block of results.md. */
export interface SectionOutput {
  title: string;
  body: string;
}

export interface SectionResult {
  outputs: SectionOutput[];
  goals: Goal[];
}

export interface Flags {
  has(name: string): boolean;
  arg(name: string): string | undefined;
  num(name: string, dflt: number): number;
}

/**
 * The demo backbone the sections run: GPT-2 small's exact shapes, or in
 * --quick the 4-layer, 128-wide demo:gpt2, where the point is that every path
 * runs and every output equals its reference (CI's smoke run), not the figures.
 */
export const benchModel = (quick: boolean) => (quick ? 'demo:gpt2' : 'demo:gpt2-small');

export interface BenchContext {
  quick: boolean;
  /** benchModel(quick): what ctx.backbone() loads and the sections' servers serve. */
  model: string;
  flags: Flags;
  cacheDir: string;
  /** Progress on stderr. */
  log(msg: string): void;
  /** `model` in this process, loaded on first use and shared until `releaseInProcess`. */
  backbone(): Promise<Backbone>;
  /** A value sections share (sessions one built and another reuses, a stack), made once. */
  shared<T>(key: string, make: () => Promise<T>): Promise<T>;
  /** Something sections shared but no section has made, or undefined. */
  peek<T>(key: string): T | undefined;
  /** Runs at `releaseInProcess` (sessions) or, for `when: 'end'`, after the last section (stacks, servers). */
  onRelease(fn: () => Promise<void> | void, when?: 'in-process' | 'end'): void;
  /** Frees the in-process backbone and its sessions before a section that needs the memory (a serving stack). */
  releaseInProcess(): Promise<void>;
  /** SVG plots the bench writes next to results.md, by file name. */
  plots: Map<string, string>;
}

export interface BenchSection {
  name: string;
  run(ctx: BenchContext): Promise<SectionResult>;
}

/** A failed request or an output that differs from its reference: the section's figures are void. */
export class BenchFailure extends Error {
  override name = 'BenchFailure';
}

/** Throws a BenchFailure unless `ok`. */
export function check(ok: boolean, message: string): asserts ok {
  if (!ok) throw new BenchFailure(message);
}

export function createContext(opts: { quick: boolean; flags: Flags; cacheDir: string; log: (m: string) => void }): BenchContext & { close(): Promise<void> } {
  const values = new Map<string, Promise<unknown>>();
  const inProcess: (() => Promise<void> | void)[] = [];
  const atEnd: (() => Promise<void> | void)[] = [];
  let bb: Promise<Backbone> | null = null;
  const ctx = {
    ...opts,
    model: benchModel(opts.quick),
    plots: new Map<string, string>(),
    backbone() {
      if (!bb) {
        const t = Date.now();
        bb = loadBackbone({ model: ctx.model, cacheDir: opts.cacheDir }).then((b) => {
          opts.log(`loaded ${b.info.name} in ${((Date.now() - t) / 1000).toFixed(1)} s`);
          return b;
        });
      }
      return bb;
    },
    shared<T>(key: string, make: () => Promise<T>): Promise<T> {
      if (!values.has(key)) values.set(key, make());
      return values.get(key) as Promise<T>;
    },
    peek<T>(key: string): T | undefined {
      return values.get(key) as T | undefined;
    },
    onRelease(fn: () => Promise<void> | void, when: 'in-process' | 'end' = 'in-process') {
      (when === 'end' ? atEnd : inProcess).push(fn);
    },
    async releaseInProcess() {
      for (const fn of inProcess.splice(0)) await fn();
      bb = null;
    },
    async close() {
      await ctx.releaseInProcess();
      for (const fn of atEnd.splice(0).reverse()) await fn();
      values.clear();
    },
  };
  return ctx;
}

export interface RunOutcome {
  outputs: SectionOutput[];
  goals: Goal[];
  failures: { section: string; error: string }[];
  /** Wall-clock seconds each section took, in the order they ran (failed ones too). */
  elapsed: { section: string; seconds: number; ok: boolean }[];
}

/** Runs the sections in order; a failure is recorded and the rest still run (so one run reports every failure). */
export async function runSections(sections: BenchSection[], ctx: BenchContext & { close(): Promise<void> }): Promise<RunOutcome> {
  const out: RunOutcome = { outputs: [], goals: [], failures: [], elapsed: [] };
  try {
    for (const s of sections) {
      ctx.log(`section ${s.name}`);
      const t0 = performance.now();
      let ok = true;
      try {
        const r = await s.run(ctx);
        out.outputs.push(...r.outputs);
        out.goals.push(...r.goals);
      } catch (err) {
        ok = false;
        const e = err as Error;
        const error = e instanceof BenchFailure ? e.message : (e.stack ?? String(e));
        out.failures.push({ section: s.name, error });
        ctx.log(`section ${s.name} FAILED: ${error}`);
      }
      const seconds = (performance.now() - t0) / 1000;
      out.elapsed.push({ section: s.name, seconds, ok });
      ctx.log(`section ${s.name} ${ok ? 'done' : 'failed'} in ${seconds.toFixed(0)} s`);
    }
  } finally {
    await ctx.close();
  }
  return out;
}
