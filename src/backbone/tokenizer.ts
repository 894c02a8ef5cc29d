/**
 * The text side of a backbone: a Hugging Face tokenizer (tokenizer.json +
 * tokenizer_config.json, as an Optimum export writes them) behind a small typed
 * interface, read through @huggingface/tokenizers.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';

export interface EncodeOptions {
  /** Add what the tokenizer's post-processor adds (bos for Llama); default false. */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Drop special tokens (eos, bos, pad, …) from the text; default true. */
  skipSpecial?: boolean;
  /**
   * The legacy " ." → "." clean-up some tokenizers ask for. Default: as the
   * tokenizer_config says. Streaming turns it off, since it is not local to a token.
   */
  cleanUpSpaces?: boolean;
}

export interface BackboneTokenizer {
  encode(text: string, opts?: EncodeOptions): number[];
  decode(ids: ArrayLike<number>, opts?: DecodeOptions): string;
  /** Any of these ends generation. Never empty when the tokenizer declares an eos. */
  readonly eosTokenIds: readonly number[];
  readonly bosTokenId: number | null;
  readonly padTokenId: number | null;
  readonly chatTemplate: string | null;
  /** Special token content → id (every added token marked special). */
  readonly specialTokens: ReadonlyMap<string, number>;
  /** Largest token id + 1 (the logits' width the tokenizer expects). */
  readonly vocabSize: number;
  readonly modelMaxLength: number | null;
  /**
   * Characters of the longest token in the vocabulary: no token covers more
   * input, so a text of n characters has at least n / maxTokenChars tokens.
   * Lets a prompt too long for any context be refused before it is tokenized.
   */
  readonly maxTokenChars: number;
}

export interface TokenizerSources {
  tokenizerJson: Record<string, unknown>;
  tokenizerConfig: Record<string, unknown>;
  generationConfig?: Record<string, unknown> | null;
  /** A template from a separate `chat_template.jinja` (newer transformers save it there). */
  chatTemplateFile?: string | null;
}

const EXPORT_HINT =
  'export the model with `optimum-cli export onnx --model <model> --task text-generation-with-past <dir>`, ' +
  'which writes tokenizer.json, tokenizer_config.json and generation_config.json beside model.onnx';

/** tokenizer_config.json writes a token either as its content or as an AddedToken dict. */
function tokenContent(value: unknown): string | null {
  if (typeof value === 'string') return value;
  if (value && typeof value === 'object' && typeof (value as { content?: unknown }).content === 'string') {
    return (value as { content: string }).content;
  }
  return null;
}

function idList(value: unknown): number[] {
  if (typeof value === 'number' && Number.isInteger(value)) return [value];
  if (Array.isArray(value)) return value.filter((v): v is number => typeof v === 'number' && Number.isInteger(v));
  return [];
}

/** chat_template may be one string or a list of named templates; the one named "default" wins. */
function pickChatTemplate(value: unknown): string | null {
  if (typeof value === 'string') return value;
  if (Array.isArray(value)) {
    const named = value.filter(
      (t): t is { name: string; template: string } =>
        !!t && typeof t === 'object' && typeof t.name === 'string' && typeof t.template === 'string',
    );
    return (named.find((t) => t.name === 'default') ?? named[0])?.template ?? null;
  }
  return null;
}

export function createTokenizer(src: TokenizerSources): BackboneTokenizer {
  const { tokenizerJson, tokenizerConfig, generationConfig } = src;
  let inner: Tokenizer;
  try {
    inner = new Tokenizer(tokenizerJson, tokenizerConfig);
  } catch (err) {
    throw new Error(`tokenizer.json could not be loaded: ${(err as Error).message}; ${EXPORT_HINT}`);
  }

  const vocab = inner.get_vocab(true);
  let vocabSize = 0;
  let maxTokenChars = 1;
  for (const [token, id] of vocab) {
    vocabSize = Math.max(vocabSize, id + 1);
    maxTokenChars = Math.max(maxTokenChars, token.length);
  }

  const specialTokens = new Map<string, number>();
  for (const [id, token] of inner.get_added_tokens_decoder()) if (token.special) specialTokens.set(token.content, id);

  const idOf = (key: string): number | null => {
    const content = tokenContent(tokenizerConfig[key]);
    return content === null ? null : (inner.token_to_id(content) ?? null);
  };
  const fromGeneration = (key: string): number[] => idList(generationConfig?.[key]);

  // generation_config lists every id that ends a turn (Llama 3: end_of_text and eot);
  // the tokenizer's eos is kept too, as vLLM does, in case the two disagree.
  const eos = [...fromGeneration('eos_token_id')];
  const tokenizerEos = idOf('eos_token');
  if (tokenizerEos !== null && !eos.includes(tokenizerEos)) eos.push(tokenizerEos);

  const bosTokenId = fromGeneration('bos_token_id')[0] ?? idOf('bos_token');
  const padTokenId = fromGeneration('pad_token_id')[0] ?? idOf('pad_token');
  const chatTemplate = pickChatTemplate(tokenizerConfig.chat_template) ?? src.chatTemplateFile ?? null;
  const maxLength = tokenizerConfig.model_max_length;
  // HF writes a huge sentinel (1e30) when the length is unknown.
  const modelMaxLength = typeof maxLength === 'number' && maxLength < 1e9 ? maxLength : null;

  return {
    encode: (text, opts) => inner.encode(text, { add_special_tokens: opts?.addSpecialTokens ?? false }).ids,
    // tokenizers.js throws on an empty list; a stream's empty window is ordinary.
    decode: (ids, opts) =>
      ids.length === 0
        ? ''
        : inner.decode(Array.from(ids), {
            skip_special_tokens: opts?.skipSpecial ?? true,
            ...(opts?.cleanUpSpaces === undefined ? {} : { clean_up_tokenization_spaces: opts.cleanUpSpaces }),
          }),
    eosTokenIds: eos,
    bosTokenId,
    padTokenId,
    chatTemplate,
    specialTokens,
    vocabSize,
    modelMaxLength,
    maxTokenChars,
  };
}

async function readJson(path: string, required: boolean): Promise<Record<string, unknown> | null> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' && !required) return null;
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new Error(`missing ${path}; ${EXPORT_HINT}`);
    throw err;
  }
  try {
    return JSON.parse(text) as Record<string, unknown>;
  } catch (err) {
    throw new Error(`${path} is not valid JSON (${(err as Error).message}); ${EXPORT_HINT}`);
  }
}

async function readOptionalText(path: string): Promise<string | null> {
  try {
    return await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

/** Loads the tokenizer of a model directory in Optimum's layout. */
export async function loadTokenizer(modelDir: string): Promise<BackboneTokenizer> {
  const [tokenizerJson, tokenizerConfig, generationConfig, chatTemplateFile] = await Promise.all([
    readJson(join(modelDir, 'tokenizer.json'), true),
    readJson(join(modelDir, 'tokenizer_config.json'), true),
    readJson(join(modelDir, 'generation_config.json'), false),
    readOptionalText(join(modelDir, 'chat_template.jinja')),
  ]);
  return createTokenizer({
    tokenizerJson: tokenizerJson!,
    tokenizerConfig: tokenizerConfig!,
    generationConfig,
    chatTemplateFile,
  });
}
