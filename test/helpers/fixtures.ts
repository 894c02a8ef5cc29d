/**
 * Real torch exports committed under test/fixtures/torch/<name>/ by
 * scripts/export-fixtures.py: Hugging Face's module names and math, exported by
 * torch.onnx.export in Optimum's layout, each with a PEFT LoRA (`lora/`) and
 * PyTorch's own greedy ids (`expected.json`, full recompute, no cache), bare and
 * with the LoRA merged into the weights. CI never needs torch: only these files.
 */
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const TORCH_FIXTURES_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'torch');

/** GPT-2 (Conv1D, fixed causal bias), Llama (GQA repeat_kv, logits.float()), Qwen2-style (q/k/v biases, tied). */
export const TORCH_FIXTURE_NAMES = ['gpt2', 'llama', 'qwen2'] as const;
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
  /** The PEFT LoRA (adapter_config.json + adapter_model.safetensors). */
  loraDir: string;
  /** max_position_embeddings / n_positions. */
  maxPositions: number;
  /** Tokens generated per recorded prompt. */
  maxNewTokens: number;
  prompts: RecordedPrompt[];
}

export function torchFixture(name: TorchFixtureName): TorchFixture {
  const dir = join(TORCH_FIXTURES_DIR, name);
  const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as {
    max_positions: number; max_new_tokens: number; prompts: RecordedPrompt[]; lora: { dir: string };
  };
  return {
    name, dir, loraDir: join(dir, expected.lora.dir),
    maxPositions: expected.max_positions, maxNewTokens: expected.max_new_tokens, prompts: expected.prompts,
  };
}

export const torchFixtures = (): TorchFixture[] => TORCH_FIXTURE_NAMES.map(torchFixture);
