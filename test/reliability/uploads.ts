/**
 * Fuzzed delta registrations, in process against a real Registry and store:
 * byte mutations of real files (the shared PEFT GPT-2 fixture, the project's
 * OpenDelta fixtures) and fast-check-built configs and safetensors headers.
 * Every case must end in a record or a 4xx ServeError within its time limit;
 * afterwards every delta the store lists must load, and no temp folder may be left.
 */
import { readdir, readFile, rm, writeFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import fc from 'fast-check';
import type { BackboneInfo } from '../../src/backbone/types.js';
import { ServeError } from '../../src/errors.js';
import { Registry } from '../../src/deltas/registry.js';
import { gpt2Like, gpt2Small } from '../helpers/backbone-info.js';
import { FIXTURES, REPO_FIXTURES, Rng, type CategoryResult, newResult, withTimeout } from './common.js';

interface Base {
  label: string;
  backbone: BackboneInfo;
  files: Record<string, Buffer>;
}

async function bases(): Promise<Base[]> {
  const out: Base[] = [];
  const peft = join(FIXTURES, 'peft-gpt2-lora-causal');
  out.push({
    label: 'peft-gpt2-lora', backbone: gpt2Small(),
    files: {
      'adapter_config.json': await readFile(join(peft, 'adapter_config.json')),
      'adapter_model.safetensors': await readFile(join(peft, 'adapter_model.safetensors')),
    },
  });
  for (const kind of await readdir(REPO_FIXTURES)) {
    const dir = join(REPO_FIXTURES, kind);
    out.push({
      label: `opendelta-${kind}`, backbone: gpt2Like(1, 16),
      files: { 'config.json': await readFile(join(dir, 'config.json')), 'model.safetensors': await readFile(join(dir, 'model.safetensors')) },
    });
  }
  return out;
}

/** The safetensors header as JSON, and where the data starts. */
function header(buf: Buffer): { json: Record<string, unknown>; start: number } | null {
  if (buf.length < 8) return null;
  const n = Number(buf.readBigUInt64LE(0));
  try {
    return { json: JSON.parse(buf.subarray(8, 8 + n).toString('utf8')), start: 8 + n };
  } catch {
    return null;
  }
}

function withHeader(buf: Buffer, json: Record<string, unknown>, start: number): Buffer {
  const h = Buffer.from(JSON.stringify(json));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(h.length));
  return Buffer.concat([len, h, buf.subarray(start)]);
}

const BOMBS = ['(.*.*)*X', '(a+)+$', '((a|a)*)*b', '(.*){1,32000}[bc]', '(?=x)c_attn', '(c_attn)\\1', '[', '\\'];
const LOOKALIKES = ['c_аttn', 'c_attn\u200b', 'с_attn', 'ｃ_attn', '../c_attn', 'c_attn\0', '/etc/passwd'];

/** One mutation of a base delta: which file, what was done, the new bytes. */
type Mutation = (files: Record<string, Buffer>, rnd: Rng) => string;

const weightsName = (files: Record<string, Buffer>) => Object.keys(files).find((n) => n.endsWith('.safetensors'))!;
const configName = (files: Record<string, Buffer>) => Object.keys(files).find((n) => n.endsWith('.json'))!;

const MUTATIONS: Record<string, Mutation> = {
  truncate(files, rnd) {
    const w = weightsName(files);
    files[w] = files[w].subarray(0, rnd.nextInt(0, files[w].length - 1));
    return 'truncated';
  },
  bitflip(files, rnd) {
    const w = rnd.nextInt(0, 1) ? weightsName(files) : configName(files);
    const b = Buffer.from(files[w]);
    for (let i = rnd.nextInt(1, 8); i > 0; i--) {
      const at = rnd.nextInt(0, b.length - 1);
      b[at] ^= 1 << rnd.nextInt(0, 7);
    }
    files[w] = b;
    return 'bit flips';
  },
  headerLength(files, rnd) {
    const w = weightsName(files);
    const b = Buffer.from(files[w]);
    const choices = [0n, 1n, 2n ** 63n - 1n, BigInt(b.length), BigInt(b.length) + 1n, BigInt(rnd.nextInt(0, 2 ** 31 - 1))];
    b.writeBigUInt64LE(choices[rnd.nextInt(0, choices.length - 1)]);
    files[w] = b;
    return 'header length';
  },
  offsets(files, rnd) {
    const w = weightsName(files);
    const h = header(files[w]);
    if (!h) return 'noop';
    const names = Object.keys(h.json).filter((k) => k !== '__metadata__');
    const t = h.json[names[rnd.nextInt(0, names.length - 1)]] as { data_offsets: number[] };
    const wild = [-1, 0, 2 ** 53, 1e308, 3.5, t.data_offsets[1] + 4, t.data_offsets[0] - 4];
    t.data_offsets = [wild[rnd.nextInt(0, wild.length - 1)], t.data_offsets[1]].sort(() => rnd.nextInt(0, 1) - 0.5);
    files[w] = withHeader(files[w], h.json, h.start);
    return 'offsets';
  },
  dtype(files, rnd) {
    const w = weightsName(files);
    const h = header(files[w]);
    if (!h) return 'noop';
    const names = Object.keys(h.json).filter((k) => k !== '__metadata__');
    const dts = ['F16', 'BF16', 'F64', 'I8', 'U8', 'BOOL', 'F8_E4M3', 'X', 7, null];
    (h.json[names[rnd.nextInt(0, names.length - 1)]] as { dtype: unknown }).dtype = dts[rnd.nextInt(0, dts.length - 1)];
    files[w] = withHeader(files[w], h.json, h.start);
    return 'dtype';
  },
  values(files, rnd) {
    const w = weightsName(files);
    const h = header(files[w]);
    if (!h) return 'noop';
    const b = Buffer.from(files[w]);
    const specials = [NaN, Infinity, -Infinity, 3e38, -3.4e38, 1e-45];
    for (let i = rnd.nextInt(1, 4); i > 0; i--) {
      const at = h.start + 4 * rnd.nextInt(0, Math.floor((b.length - h.start) / 4) - 1);
      b.writeFloatLE(specials[rnd.nextInt(0, specials.length - 1)], at);
    }
    files[w] = b;
    return 'NaN/Inf/huge values';
  },
  shape(files, rnd) {
    const w = weightsName(files);
    const h = header(files[w]);
    if (!h) return 'noop';
    const names = Object.keys(h.json).filter((k) => k !== '__metadata__');
    const t = h.json[names[rnd.nextInt(0, names.length - 1)]] as { shape: unknown };
    const shapes: unknown[] = [[], [0], [1], [2 ** 31, 2 ** 31], [-1, 4], [1, 1, 1, 1, 1], ['a'], null, [1.5]];
    t.shape = shapes[rnd.nextInt(0, shapes.length - 1)];
    files[w] = withHeader(files[w], h.json, h.start);
    return 'shape/rank';
  },
};

/** Config values of every JSON type for the fields a config has (and a few it should not). */
const configArb = fc.record({
  field: fc.constantFrom('r', 'lora_alpha', 'target_modules', 'peft_type', 'fan_in_fan_out', 'layers_to_transform', 'rank_pattern',
    'modified_modules', 'delta_type', 'bottleneck_dim', 'reduction_factor', 'lora_r', 'feedforward_modules', 'exclude_modules', '__proto__'),
  value: fc.oneof(fc.jsonValue(), fc.constantFrom(...BOMBS, ...LOOKALIKES), fc.constantFrom(-1, 0, 1e9, 2 ** 53, 0.5, NaN)),
});

export interface UploadFuzzOptions {
  cases: number;
  seed: number;
  dir: string;
  /** Per-case limit; a case that takes longer counts as a hang (failure). */
  caseMs?: number;
}

export async function fuzzUploads(opts: UploadFuzzOptions): Promise<CategoryResult> {
  const result = newResult('delta uploads (fuzzed, in process)');
  const all = await bases();
  const registries = new Map<string, Registry>();
  for (const b of all) {
    registries.set(b.label, await Registry.open({ dir: join(opts.dir, b.label), backbone: b.backbone, cacheBytes: 1 << 30, store: { staleTempMs: 0 } }));
  }
  const src = join(opts.dir, 'src');
  const rnd = new Rng(opts.seed);
  const kinds = [...Object.keys(MUTATIONS), 'config', 'config', 'none'];
  const configs = fc.sample(configArb, { numRuns: opts.cases, seed: opts.seed });
  for (let i = 0; i < opts.cases; i++) {
    const base = all[i % all.length];
    const files = { ...base.files };
    const kind = kinds[rnd.nextInt(0, kinds.length - 1)];
    if (kind === 'config') {
      const c = configs[i];
      const cfg = JSON.parse(files[configName(files)].toString('utf8')) as Record<string, unknown>;
      cfg[c.field] = c.value;
      files[configName(files)] = Buffer.from(JSON.stringify(cfg));
    } else if (kind !== 'none') {
      MUTATIONS[kind](files, rnd);
    }
    const dir = join(src, String(i));
    await mkdir(dir, { recursive: true });
    for (const [name, bytes] of Object.entries(files)) await writeFile(join(dir, name), bytes);
    const registry = registries.get(base.label)!;
    const id = `d${i % 50}`;
    result.cases++;
    result.byKind[kind] = (result.byKind[kind] ?? 0) + 1;
    try {
      await withTimeout(registry.register(id, Object.keys(files).map((name) => ({ name, path: join(dir, name) })), { replace: true }), opts.caseMs ?? 10_000);
      result.accepted++;
    } catch (err) {
      if (err instanceof ServeError && err.status < 500) result.refused++;
      else {
        if (err instanceof ServeError) result.fiveXX++;
        result.failures.push(`${base.label}/${kind} #${i}: ${(err as Error).message.slice(0, 300)}`);
      }
    }
    await rm(dir, { recursive: true, force: true });
  }
  // Data lost: every delta a store lists must load and validate again; nothing half-written may be left.
  for (const [label, registry] of registries) {
    for (const rec of await registry.list()) {
      try {
        await registry.load(rec.id);
      } catch (err) {
        result.dataLost++;
        result.failures.push(`${label}/${rec.id} does not load: ${(err as Error).message}`);
      }
    }
    result.tempLeft += (await readdir(join(opts.dir, label))).filter((e) => e.startsWith('.')).length;
  }
  return result;
}
