/**
 * Real torch exports committed under test/fixtures/torch/<name>/ by
 * scripts/export-fixtures.py: Hugging Face's module names and math, exported by
 * torch.onnx.export in Optimum's layout, each with a PEFT LoRA (`lora/`) and
 * PyTorch's own greedy ids (`expected.json`, full recompute, no cache), bare and
 * with the LoRA merged into the weights. CI never needs torch: only these files.
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const TORCH_FIXTURES_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'torch');

/**
 * GPT-2 (Conv1D, fixed causal bias), Llama (GQA repeat_kv, logits.float()), Qwen2-style (q/k/v biases, tied);
 * Qwen2 again in the onnx-community layout (onnx/decoder_model_merged.onnx, its use_cache_branch If; the
 * same weights, so qwen2's recorded ids and LoRA); GPT-2 in float16 (onnx/model_fp16.onnx, its ids recorded
 * by PyTorch on the float16-rounded weights).
 */
export const TORCH_FIXTURE_NAMES = ['gpt2', 'llama', 'qwen2', 'qwen2-onnx-community', 'gpt2-fp16'] as const;
export type TorchFixtureName = (typeof TORCH_FIXTURE_NAMES)[number];

export interface RecordedPrompt {
  text: string;
  /** The prompt as the fixture's tokenizer encodes it with special tokens (Llama's bos first). */
  prompt_ids: number[];
  /** PyTorch's greedy ids for the bare model. */
  bare: number[];
  /** PyTorch's greedy ids with the LoRA merged into the weights (PEFT's merge_and_unload). */
  lora: number[];
  /** Smallest gap between the best and second-best logit over the steps: how far from a tie. */
  min_margin_bare: number;
  min_margin_lora: number;
}

export interface TorchFixture {
  name: TorchFixtureName;
  /** The model directory (model.onnx, config.json, tokenizer files). */
  dir: string;
  /** Where PyTorch's records for these weights live: `dir`, or a layout variant's base model's. */
  recordedDir: string;
  /** The PEFT LoRA (adapter_config.json + adapter_model.safetensors). */
  loraDir: string;
  /** max_position_embeddings / n_positions. */
  maxPositions: number;
  /** Tokens generated per recorded prompt. */
  maxNewTokens: number;
  prompts: RecordedPrompt[];
  /** A prompt of 3/4 of the context and PyTorch's greedy ids with the LoRA up to the last position (not for float16). */
  fullContext: { text: string; prompt_ids: number[]; lora?: number[] };
}

export function torchFixture(name: TorchFixtureName): TorchFixture {
  const dir = join(TORCH_FIXTURES_DIR, name);
  // A layout variant without its own expected.json shares its base model's (same weights).
  const own = join(dir, 'expected.json');
  const recorded = existsSync(own) ? dir : join(TORCH_FIXTURES_DIR, name.split('-')[0]);
  const expected = JSON.parse(readFileSync(join(recorded, 'expected.json'), 'utf8')) as {
    max_positions: number; max_new_tokens: number; prompts: RecordedPrompt[]; lora: { dir: string };
    full_context: TorchFixture['fullContext'];
  };
  return {
    name, dir, recordedDir: recorded, loraDir: join(recorded, expected.lora.dir),
    maxPositions: expected.max_positions, maxNewTokens: expected.max_new_tokens, prompts: expected.prompts,
    fullContext: expected.full_context,
  };
}

export const torchFixtures = (): TorchFixture[] => TORCH_FIXTURE_NAMES.map(torchFixture);

/** A delta of one kind on a torch fixture and PyTorch's greedy ids with it (scripts/record-torch-kinds.py). */
export interface TorchKindFixture {
  kind: string;
  /** The delta's files, as PEFT or OpenDelta saves it. */
  dir: string;
  prompts: { text: string; ids: number[]; min_margin: number }[];
}

export function torchKinds(f: TorchFixture): TorchKindFixture[] {
  const root = join(f.recordedDir, 'kinds');
  // gpt2-fp16's weights are rounded: scripts/record-torch-kinds.py records the float32 models only.
  if (!existsSync(root)) return [];
  const recorded = JSON.parse(readFileSync(join(root, 'expected.json'), 'utf8')) as Record<string, { dir: string; prompts: TorchKindFixture['prompts'] }>;
  return Object.entries(recorded).map(([kind, r]) => ({ kind, dir: join(root, r.dir), prompts: r.prompts }));
}

/** PyTorch's ids up to and including the first eos (the server stops there). */
export function untilEos(ids: number[], eos: number): number[] {
  const at = ids.indexOf(eos);
  return at < 0 ? ids : ids.slice(0, at + 1);
}
