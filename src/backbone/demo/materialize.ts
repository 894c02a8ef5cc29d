/**
 * Writes an embedded demo backbone as a model directory in Optimum's layout,
 * so it is loaded by exactly the code path a real export takes. Generated once
 * into a cache folder and reused.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, rename, rm, writeFile, mkdtemp } from 'node:fs/promises';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import cliProgress from 'cli-progress';
import { buildDemoGraph, demoWeights } from './build.js';
import { buildByteTokenizer } from './byte-tokenizer.js';
import type { WeightSource } from './layers.js';
import type { DemoSpec } from './spec.js';

/** Bump when the demo graphs change, so stale cached models are not reused. */
const DEMO_VERSION = 2;

export function defaultCacheDir(): string {
  return process.env.DELTASERVE_CACHE_DIR
    ?? join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'deltaserve');
}

function paramCount(spec: DemoSpec): number {
  const H = spec.hidden;
  return spec.vocabSize * H + spec.layers * (4 * H * H + 2 * H * spec.intermediate);
}

/** Wraps a weight source with a progress bar when generating a big model on a terminal. */
function withProgress(spec: DemoSpec, source: WeightSource): { source: WeightSource; done(): void } {
  const total = paramCount(spec);
  if (total < 20_000_000 || !process.stderr.isTTY) return { source, done: () => {} };
  const bar = new cliProgress.SingleBar(
    { format: `generating ${spec.name} [{bar}] {percentage}% | {value}/{total} M params`, stream: process.stderr },
    cliProgress.Presets.shades_classic,
  );
  bar.start(Math.round(total / 1e6), 0);
  let count = 0;
  return {
    source: (name, n, kind) => {
      const out = source(name, n, kind);
      count += n;
      bar.update(Math.min(Math.round(count / 1e6), Math.round(total / 1e6)));
      return out;
    },
    done: () => bar.stop(),
  };
}

function configJson(spec: DemoSpec, ids: { bos: number; eos: number; pad: number }) {
  const common = { name_or_path: `deltaserve/${spec.name.replace(':', '-')}`, vocab_size: spec.vocabSize, bos_token_id: ids.bos, eos_token_id: ids.eos };
  if (spec.family === 'gpt2') {
    return {
      ...common, model_type: 'gpt2', architectures: ['GPT2LMHeadModel'], n_embd: spec.hidden, n_layer: spec.layers,
      n_head: spec.heads, n_inner: spec.intermediate, n_positions: spec.maxPositions, layer_norm_epsilon: spec.eps,
      activation_function: 'gelu_new', tie_word_embeddings: true,
    };
  }
  return {
    ...common, model_type: 'llama', architectures: ['LlamaForCausalLM'], hidden_size: spec.hidden,
    num_hidden_layers: spec.layers, num_attention_heads: spec.heads, num_key_value_heads: spec.kvHeads,
    intermediate_size: spec.intermediate, max_position_embeddings: spec.maxPositions, rms_norm_eps: spec.eps,
    rope_theta: spec.ropeTheta, hidden_act: 'silu', tie_word_embeddings: false,
  };
}

interface TokenizerFiles {
  tokenizerJson: Record<string, unknown>;
  tokenizerConfig: Record<string, unknown>;
  ids: { bos: number; eos: number; pad: number };
}

/** A user-supplied tokenizer.json (and the tokenizer_config.json beside it, when there is one). */
function userTokenizer(path: string, spec: DemoSpec): TokenizerFiles {
  const tokenizerJson = JSON.parse(readFileSync(path, 'utf8'));
  const cfgPath = join(dirname(path), 'tokenizer_config.json');
  const tokenizerConfig = existsSync(cfgPath) ? JSON.parse(readFileSync(cfgPath, 'utf8')) : { model_max_length: spec.maxPositions };
  const added: { id: number; content: string; special?: boolean }[] = tokenizerJson.added_tokens ?? [];
  const special = added.find((t) => t.special) ?? added[0];
  const eosName = typeof tokenizerConfig.eos_token === 'string' ? tokenizerConfig.eos_token : special?.content;
  const eos = added.find((t) => t.content === eosName)?.id ?? special?.id ?? spec.vocabSize - 1;
  return { tokenizerJson, tokenizerConfig, ids: { bos: eos, eos, pad: eos } };
}

/** Writes the model directory into `outDir` (created; must not exist or be empty). */
export async function writeDemoDir(spec: DemoSpec, outDir: string, tokenizerPath?: string): Promise<void> {
  const tok: TokenizerFiles = tokenizerPath
    ? userTokenizer(tokenizerPath, spec)
    : buildByteTokenizer({ flavour: spec.family, vocabSize: spec.vocabSize, modelMaxLength: spec.maxPositions });
  const progress = withProgress(spec, demoWeights(spec));
  const bytes = buildDemoGraph(spec, {}, progress.source).encode(spec.name);
  progress.done();
  await mkdir(outDir, { recursive: true });
  await writeFile(join(outDir, 'model.onnx'), bytes);
  await writeFile(join(outDir, 'config.json'), JSON.stringify(configJson(spec, tok.ids), null, 2));
  await writeFile(join(outDir, 'tokenizer.json'), JSON.stringify(tok.tokenizerJson));
  await writeFile(join(outDir, 'tokenizer_config.json'), JSON.stringify(tok.tokenizerConfig, null, 2));
  await writeFile(join(outDir, 'generation_config.json'), JSON.stringify({
    bos_token_id: tok.ids.bos, eos_token_id: tok.ids.eos, pad_token_id: tok.ids.pad, do_sample: false,
  }, null, 2));
}

/** The cached model directory for a demo backbone, generated on first use. */
export async function demoModelDir(spec: DemoSpec, opts: { cacheDir?: string; tokenizerPath?: string } = {}): Promise<string> {
  const cacheDir = opts.cacheDir ?? defaultCacheDir();
  const tokHash = opts.tokenizerPath
    ? createHash('sha256').update(readFileSync(opts.tokenizerPath)).digest('hex').slice(0, 12)
    : 'bytes';
  const dir = join(cacheDir, `${spec.name.replace(':', '-')}-v${DEMO_VERSION}-${tokHash}`);
  if (existsSync(join(dir, 'generation_config.json'))) return dir;
  await mkdir(cacheDir, { recursive: true });
  // Written aside and renamed, so a crash or a concurrent process never sees half a model.
  const tmp = await mkdtemp(join(cacheDir, '.tmp-'));
  try {
    await writeDemoDir(spec, tmp, opts.tokenizerPath);
    await rename(tmp, dir).catch(async (e) => {
      if (!existsSync(join(dir, 'generation_config.json'))) throw e;
    });
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
  return dir;
}
