/**
 * `npm run bench`: every benchmark section in one process, figures and ratios
 * measured side by side; medians and minima of several repetitions (this VM
 * is noisy). Prints markdown tables, writes them to bench/results.md and the
 * plots to bench/plots/*.svg.
 *
 *   npm run bench                                   # everything
 *   npm run bench -- --quick                        # CI's smoke run: tiny model and scenarios, every output checked, writes nothing
 *   npm run bench -- --sections rewrite,kv          # any of the names in SECTIONS below
 *
 * A section is a file in bench/sections/ exporting `section = { name, run }`
 * (bench/lib/runner.ts); adding one is a file plus a line in SECTIONS. When
 * any section fails (a request failed, outputs differ from their reference,
 * or it threw) the bench prints which and why, prints and writes no figures,
 * and exits 1.
 *
 * Other flags: --reps N (throughput rounds), --contexts 64,256,512, --naive N
 * (naive requests actually measured, the rest extrapolated), --sequential N,
 * --max-new N, --prompt N, --scale 10,1000,10000 (registered deltas),
 * --out FILE, --no-write. Every run prints each section's wall-clock time
 * (stderr, and a table in results.md). --quick writes no file unless --out
 * names one (its plots then go to plots-quick/ beside it), so it never
 * overwrites the full run's results.md and plots.
 *
 * The model is generated into DELTASERVE_CACHE_DIR (default ~/.cache/deltaserve)
 * on first use (~480 MB).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { benchCacheDir, machine, mdTable, progress } from './lib/common.js';
import { createContext, runSections, type BenchSection, type Flags } from './lib/runner.js';
import { section as hotswap } from './sections/hotswap.js';
import { section as hardware } from './sections/hardware.js';
import { section as http } from './sections/http.js';
import { section as kinds } from './sections/kinds.js';
import { section as kv } from './sections/kv.js';
import { section as logprobs } from './sections/logprobs.js';
import { section as naive } from './sections/naive.js';
import { section as peer } from './sections/peer.js';
import { section as prefix } from './sections/prefix.js';
import { section as quantized } from './sections/quantized.js';
import { section as rewrite } from './sections/rewrite.js';
import { section as scale } from './sections/scale.js';
import { section as throughput } from './sections/throughput.js';
import { section as torchKv } from './sections/torch-kv.js';
import { section as device } from './sections/device.js';

/** In the order they run: the in-process sections share one backbone, then the serving stacks, then real server processes. */
const SECTIONS: BenchSection[] = [rewrite, kv, kinds, logprobs, prefix, hardware, torchKv, throughput, naive, http, peer, hotswap, scale, quantized, device];

const argv = process.argv.slice(2);
const KNOWN = new Set(['quick', 'sections', 'reps', 'contexts', 'naive', 'sequential', 'max-new', 'prompt', 'scale', 'out', 'no-write', 'help']);
const flags: Flags = {
  has: (name) => argv.includes(`--${name}`),
  arg(name) {
    const i = argv.indexOf(`--${name}`);
    if (i < 0) return undefined;
    const v = argv[i + 1];
    if (v === undefined || v.startsWith('--')) throw new Error(`--${name} needs a value`);
    return v;
  },
  num(name, dflt) {
    const v = flags.arg(name);
    if (v === undefined) return dflt;
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new Error(`--${name} must be a number, got ${v}`);
    return n;
  },
};
for (const a of argv) {
  if (a.startsWith('--') && !KNOWN.has(a.slice(2))) throw new Error(`unknown flag ${a}; see the comment at the top of bench/run.ts`);
}
if (flags.has('help')) {
  console.log(`npm run bench -- [--quick] [--sections ${SECTIONS.map((s) => s.name).join(',')}] [--reps N] [--contexts 64,256,512] [--naive N] [--sequential N] [--max-new N] [--prompt N] [--scale 10,1000,10000] [--out FILE] [--no-write]`);
  process.exit(0);
}

const QUICK = flags.has('quick');
const chosen = (flags.arg('sections') ?? SECTIONS.map((s) => s.name).join(',')).split(',').map((s) => s.trim());
for (const name of chosen) {
  if (!SECTIONS.some((s) => s.name === name)) throw new Error(`unknown section ${name}: use ${SECTIONS.map((s) => s.name).join(', ')}`);
}
const selected = SECTIONS.filter((s) => chosen.includes(s.name));
const OUT = flags.arg('out') ?? fileURLToPath(new URL('./results.md', import.meta.url));
/**
 * A quick run (CI's smoke run) writes nothing unless --out names a file: its
 * figures are not ones to quote, and the committed results.md and plots are
 * the full run's. It still checks every output and exits 1 on any failure.
 */
const WRITE = !flags.has('no-write') && (!QUICK || flags.arg('out') !== undefined);

async function main(): Promise<number> {
  const cacheDir = benchCacheDir();
  const started = new Date();
  const t0 = Date.now();
  const m0 = machine();
  const command = process.env.npm_lifecycle_event === 'bench'
    ? `npm run bench${argv.length ? ` -- ${argv.join(' ')}` : ''}`
    : `npx tsx bench/run.ts${argv.length ? ` ${argv.join(' ')}` : ''}`;
  progress(`sections: ${selected.map((s) => s.name).join(', ')}${QUICK ? ' (quick)' : ''}; model cache ${cacheDir}`);

  const ctx = createContext({ quick: QUICK, flags, cacheDir, log: progress });
  const outcome = await runSections(selected, ctx);
  const total = (Date.now() - t0) / 1000;
  const timeTable = mdTable(['section', 'seconds', ''], [
    ...outcome.elapsed.map((e) => [e.section, e.seconds.toFixed(0), e.ok ? '' : 'failed']),
    ['total', total.toFixed(0), ''],
  ], ['l', 'r', 'l']);
  // Always, failed run or not: how long each section takes is what sizes the profiles (README, "how to reproduce").
  console.error(`\nSection times${QUICK ? ' (quick)' : ''}, load average at start ${m0.load}:\n\n${timeTable}\n`);

  if (outcome.failures.length) {
    // No figures: a run with a failed request or a wrong output is not one to quote.
    console.error(`\nbench FAILED (${total.toFixed(0)} s): no figures are printed or written.`);
    for (const f of outcome.failures) console.error(`- section ${f.section}: ${f.error}`);
    return 1;
  }

  const m1 = machine();
  const goalTable = outcome.goals.length
    ? mdTable(['goal', 'measured', 'met?'], outcome.goals.map((g) => [g.what, g.measured, g.met]), ['l', 'l', 'l'])
    : '(no goals measured)';
  const parts = outcome.outputs.map((o) => `## ${o.title}\n\n${o.body}\n`);
  parts.push(`## Section times\n\n${timeTable}\n`);
  for (const p of parts) console.log(`\n${p}`);
  console.log(`\n## Goals\n\n${goalTable}\n\nTotal ${total.toFixed(0)} s.`);

  const header = [
    '# deltaserve benchmarks (`npm run bench`)',
    '',
    `- Date: ${started.toISOString()}`,
    `- Command: \`${command}\`${QUICK ? ' (quick: fewer repetitions; not the figures to quote)' : ''}`,
    `- Machine: ${m0.nproc} × ${m0.cpu} (nproc ${m0.nproc}), Node ${m0.node}, onnxruntime-node ${m0.ort}, CPU execution provider, ORT intra-op threads = default (one per core)`,
    `- Load average (1, 5, 15 min) at start: ${m0.load}; at end: ${m1.load} — a shared 2-core VM: other processes running at the same time inflate the medians; the minima are the least disturbed figures.`,
    `- Model: ${QUICK ? 'demo:gpt2 (4 layers, 128 wide: a smoke run)' : 'demo:gpt2-small (GPT-2 small\'s exact shapes: 12 layers, 768 wide, 12 heads, vocab 50257)'}, cache ${cacheDir}`,
    `- Sections: ${selected.map((s) => s.name).join(', ')}; total ${total.toFixed(0)} s`,
    '',
  ].join('\n');
  if (WRITE) {
    mkdirSync(dirname(OUT), { recursive: true });
    writeFileSync(OUT, `${header}\n## Goals\n\n${goalTable}\n\n${parts.join('\n')}`);
    progress(`wrote ${OUT}`);
    if (ctx.plots.size) {
      const dir = join(dirname(OUT), QUICK ? 'plots-quick' : 'plots');
      mkdirSync(dir, { recursive: true });
      for (const [name, svg] of ctx.plots) writeFileSync(join(dir, name), svg);
      progress(`wrote ${ctx.plots.size} plots to ${dir}`);
    }
  }
  return 0;
}

const code = await main();
// The ORT thread pools of released sessions and the worker are gone; exit even if a handle lingers.
process.exit(code);
