/**
 * Server configuration. One table (`CONFIG_OPTIONS`) drives the environment
 * variables, the CLI flags and their --help text, so the three cannot drift.
 * Precedence: CLI flag, then environment variable, then default.
 */
import { Option, type Command } from 'commander';
import { z } from 'zod';
import { GRAPH_SITES, type SitePlan } from './deltas/kinds/index.js';
import { FAULTS, type Fault } from './faults.js';

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

const UNITS: Record<string, number> = {
  '': 1, b: 1,
  k: 1e3, kb: 1e3, m: 1e6, mb: 1e6, g: 1e9, gb: 1e9,
  ki: 2 ** 10, kib: 2 ** 10, mi: 2 ** 20, mib: 2 ** 20, gi: 2 ** 30, gib: 2 ** 30,
};

/** Byte sizes accept a unit (`512MiB`, `2G`) because nobody types 2147483648 correctly. */
const bytes = z.string().trim().transform((s, ctx) => {
  const m = /^(\d+(?:\.\d+)?)\s*([a-z]*)$/i.exec(s);
  const unit = m ? UNITS[m[2].toLowerCase()] : undefined;
  if (!m || unit === undefined) {
    ctx.addIssue({ code: 'custom', message: `expected a byte size such as 1048576, 512MiB or 2G, got "${s}"` });
    return z.NEVER;
  }
  return Math.floor(Number(m[1]) * unit);
});

const int = (min: number, max = Number.MAX_SAFE_INTEGER) =>
  z.string().trim().transform((s, ctx) => {
    const n = Number(s);
    if (!/^-?\d+$/.test(s) || n < min || n > max) {
      ctx.addIssue({ code: 'custom', message: `expected an integer from ${min} to ${max}, got "${s}"` });
      return z.NEVER;
    }
    return n;
  });

const SITE_NAMES = GRAPH_SITES.map((s) => s.name);

/** `lora:all,adapter:c_proj+down_proj,bias:none` → { lora: 'all', adapter: ['c_proj', 'down_proj'], bias: [] } */
const sitePlan = z.string().trim().transform((s, ctx) => {
  const plan: SitePlan = {};
  for (const part of s.split(',').map((p) => p.trim()).filter(Boolean)) {
    const [site, targets] = part.split(':').map((x) => x.trim());
    if (!SITE_NAMES.includes(site) || !targets) {
      ctx.addIssue({ code: 'custom', message: `expected site:targets with site one of ${SITE_NAMES.join(', ')}, got "${part}"` });
      return z.NEVER;
    }
    plan[site] = targets === 'all' ? 'all' : targets === 'none' ? [] : targets.split('+');
  }
  return plan;
});

/** `engine-step,…`: the test-only fault hooks to mount (src/http/routes/faults.ts). */
const faultList = z.string().trim().transform((s, ctx) => {
  const names = s.split(',').map((p) => p.trim()).filter(Boolean);
  const unknown = names.filter((n) => !(FAULTS as readonly string[]).includes(n));
  if (unknown.length) {
    ctx.addIssue({ code: 'custom', message: `unknown fault ${unknown.map((u) => `"${u}"`).join(', ')}: expected a comma-separated list of ${FAULTS.join(', ')}` });
    return z.NEVER;
  }
  return names as Fault[];
});

const text = z.string();
const optionalText = z.string().transform((s) => (s === '' ? null : s));

interface OptionSpec<T> {
  env: string;
  flag: string;
  help: string;
  /** Shown in --help; `undefined` = no default (the variable is optional). */
  defaultText?: string;
  schema: z.ZodType<T, string>;
  fallback: T;
  choices?: readonly string[];
}

const spec = <T>(s: OptionSpec<T>) => s;

export const CONFIG_OPTIONS = {
  host: spec({ env: 'HOST', flag: '--host <addr>', help: 'listen address', defaultText: '0.0.0.0', schema: text, fallback: '0.0.0.0' }),
  port: spec({ env: 'PORT', flag: '--port <n>', help: 'listen port (0 = any free port)', defaultText: '8080', schema: int(0, 65535), fallback: 8080 }),
  model: spec({
    env: 'DELTASERVE_MODEL', flag: '--model <dir|demo[:family]>',
    help: 'a model directory (Optimum export) or an embedded backbone: demo, demo:llama, demo:gpt2, demo:gpt2-small',
    defaultText: 'demo', schema: text, fallback: 'demo',
  }),
  deltasDir: spec({ env: 'DELTASERVE_DELTAS_DIR', flag: '--deltas-dir <dir>', help: 'the delta store (may be shared by replicas)', defaultText: './deltas', schema: text, fallback: './deltas' }),
  importDir: spec({
    env: 'DELTASERVE_IMPORT_DIR', flag: '--import-dir <dir>',
    help: 'the only folder imports by path may read from (unset = imports by path refused)',
    schema: optionalText, fallback: null as string | null,
  }),
  adminToken: spec({
    env: 'DELTASERVE_ADMIN_TOKEN', flag: '--admin-token <token>',
    help: 'bearer token for the admin endpoints (unset = admin from loopback addresses only)',
    schema: optionalText, fallback: null as string | null,
  }),
  cacheBytes: spec({
    env: 'DELTASERVE_CACHE_BYTES', flag: '--cache-bytes <bytes>', help: 'delta cache budget, e.g. 512MiB',
    defaultText: 'sized from the backbone', schema: bytes, fallback: null as number | null,
  }),
  kvCacheBytes: spec({
    env: 'DELTASERVE_KV_CACHE_BYTES', flag: '--kv-cache-bytes <bytes>',
    help: 'KV cache budget: requests are admitted while their prompt + max_new_tokens fit in it',
    defaultText: 'every row at full context, at most 4GiB', schema: bytes, fallback: null as number | null,
  }),
  bankBytes: spec({
    env: 'DELTASERVE_BANK_BYTES', flag: '--bank-bytes <bytes>',
    help: 'delta bank budget: a request waits while the banks of the running rows and its own would pass it',
    defaultText: '1GiB', schema: bytes, fallback: 2 ** 30,
  }),
  maxBatch: spec({ env: 'DELTASERVE_MAX_BATCH', flag: '--max-batch <n>', help: 'max rows in one engine step', defaultText: '32', schema: int(1, 4096), fallback: 32 }),
  maxQueue: spec({ env: 'DELTASERVE_MAX_QUEUE', flag: '--max-queue <n>', help: 'max waiting requests before 429', defaultText: '1024', schema: int(0), fallback: 1024 }),
  ep: spec({
    env: 'DELTASERVE_EP', flag: '--ep <provider>', help: 'execution provider', defaultText: 'cpu',
    schema: z.enum(['cpu', 'cuda', 'webgpu']), fallback: 'cpu' as 'cpu' | 'cuda' | 'webgpu', choices: ['cpu', 'cuda', 'webgpu'],
  }),
  logLevel: spec({
    env: 'LOG_LEVEL', flag: '--log-level <level>', help: 'pino log level', defaultText: 'info',
    schema: z.enum(LOG_LEVELS), fallback: 'info' as (typeof LOG_LEVELS)[number], choices: LOG_LEVELS,
  }),
  maxLoras: spec({
    env: 'DELTASERVE_MAX_LORAS', flag: '--max-loras <n>', help: 'max distinct deltas in one engine step (vLLM --max-loras)',
    defaultText: '32', schema: int(1, 4096), fallback: 32,
  }),
  maxRank: spec({
    env: 'DELTASERVE_MAX_RANK', flag: '--max-rank <n>', help: 'largest LoRA rank / adapter bottleneck accepted (vLLM --max-lora-rank)',
    defaultText: '64', schema: int(1, 65536), fallback: 64,
  }),
  maxBodyBytes: spec({
    env: 'DELTASERVE_MAX_BODY_BYTES', flag: '--max-body-bytes <bytes>', help: 'largest JSON request body',
    defaultText: '4MiB', schema: bytes, fallback: 4 * 2 ** 20,
  }),
  maxUploadBytes: spec({
    env: 'DELTASERVE_MAX_UPLOAD_BYTES', flag: '--max-upload-bytes <bytes>', help: 'largest multipart delta upload (all files together)',
    defaultText: '2GiB', schema: bytes, fallback: 2 * 2 ** 30,
  }),
  uploadTmpDir: spec({
    env: 'DELTASERVE_UPLOAD_TMP_DIR', flag: '--upload-tmp-dir <dir>',
    help: 'where multipart uploads are written while they arrive (one deltaserve-upload-* folder each, removed on every exit path and at startup)',
    defaultText: "the OS's temp folder", schema: optionalText, fallback: null as string | null,
  }),
  requestTimeoutSeconds: spec({
    env: 'DELTASERVE_REQUEST_TIMEOUT_SECONDS', flag: '--request-timeout-seconds <s>',
    help: 'a client must have sent its whole request (headers and body) within this; slower connections are closed (slow-loris). Responses, streams included, are not limited',
    defaultText: '300', schema: int(1, 86400), fallback: 300,
  }),
  drainSeconds: spec({
    env: 'DELTASERVE_DRAIN_SECONDS', flag: '--drain-seconds <s>', help: 'on SIGTERM, how long running requests may finish before the server closes',
    defaultText: '30', schema: int(0, 86400), fallback: 30,
  }),
  sites: spec({
    env: 'DELTASERVE_SITES', flag: '--sites <plan>',
    help: `which linear modules get each delta site (${SITE_NAMES.join(', ')}): site:targets pairs, targets all, none or module suffixes joined by +, e.g. lora:all,adapter:c_proj+down_proj,bias:all`,
    defaultText: 'lora:all,bias:all, adapters on each block\'s output linears, ia3 where PEFT puts it', schema: sitePlan, fallback: {} as SitePlan,
  }),
  prefillChunkTokens: spec({
    env: 'DELTASERVE_PREFILL_CHUNK_TOKENS', flag: '--prefill-chunk-tokens <n>',
    help: 'padded prompt tokens per prefill run; longer prompts are prefilled in chunks between decode steps',
    defaultText: '512', schema: int(1, 1 << 20), fallback: 512,
  }),
  threads: spec({
    env: 'DELTASERVE_THREADS', flag: '--threads <n>', help: 'ORT intra-op threads (0 = one per core)',
    defaultText: '0', schema: int(0, 1024), fallback: 0,
  }),
  metricsTaskLabels: spec({
    env: 'DELTASERVE_METRICS_TASK_LABELS', flag: '--metrics-task-labels <n>',
    help: 'the busiest N tasks keep their own `task` metric label; the rest are counted as `other`',
    defaultText: '20', schema: int(1, 10000), fallback: 20,
  }),
  faults: spec({
    env: 'DELTASERVE_FAULTS', flag: '--faults <list>',
    help: `TEST ONLY, never in production: fault hooks to expose (${FAULTS.join(', ')}); engine-step mounts POST /v1/faults/engine-step (admin), which makes the engine's next runs fail`,
    schema: faultList, fallback: [] as Fault[],
  }),
} as const;

type Options = typeof CONFIG_OPTIONS;
export type ConfigKey = keyof Options;
export type Config = { readonly [K in ConfigKey]: Options[K]['fallback'] };

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n  ${problems.join('\n  ')}`);
    this.name = 'ConfigError';
  }
}

/** Raw values from commander, keyed like Config (commander camel-cases `--max-batch` to `maxBatch`). */
export type ConfigFlags = Partial<Record<ConfigKey, string | undefined>>;

/**
 * Builds the config from flags and environment. Empty environment variables
 * count as unset, the way a shell `FOO= cmd` usually means.
 */
export function loadConfig(env: NodeJS.ProcessEnv = process.env, flags: ConfigFlags = {}): Config {
  const out: Record<string, unknown> = {};
  const problems: string[] = [];
  for (const [key, opt] of Object.entries(CONFIG_OPTIONS) as [ConfigKey, OptionSpec<unknown>][]) {
    const fromFlag = flags[key];
    const fromEnv = env[opt.env];
    const raw = fromFlag !== undefined ? fromFlag : fromEnv !== undefined && fromEnv !== '' ? fromEnv : undefined;
    if (raw === undefined) {
      out[key] = opt.fallback;
      continue;
    }
    const parsed = opt.schema.safeParse(raw);
    if (parsed.success) out[key] = parsed.data;
    else {
      const source = fromFlag !== undefined ? opt.flag.split(' ')[0] : opt.env;
      problems.push(`${source}: ${parsed.error.issues.map((i) => i.message).join('; ')}`);
    }
  }
  if (problems.length) throw new ConfigError(problems);
  return Object.freeze(out) as Config;
}

/**
 * Declares every config flag on a commander command, each naming its
 * environment variable in --help. Commander fills a flag from its variable
 * itself; pass `cmd.opts()` to `loadConfig` as the flags.
 */
export function addConfigOptions(cmd: Command): Command {
  for (const opt of Object.values(CONFIG_OPTIONS) as OptionSpec<unknown>[]) {
    const help = opt.defaultText ? `${opt.help} (default: ${opt.defaultText})` : opt.help;
    const option = new Option(opt.flag, help).env(opt.env);
    if (opt.choices) option.choices(opt.choices);
    cmd.addOption(option);
  }
  return cmd;
}
