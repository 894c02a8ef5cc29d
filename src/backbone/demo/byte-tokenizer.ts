/**
 * A byte-level tokenizer for the embedded demo backbones, written in Hugging
 * Face's `tokenizer.json` format so that it goes through the same loader
 * (@huggingface/tokenizers) as a real model's tokenizer.
 *
 * Id layout (every flavour):
 *   0..255                      one token per byte value: id = byte
 *   256..256+S-1                the flavour's special tokens, in declaration order
 *   256+S..vocabSize-1          placeholders `<|unused_N|>` (N counts from 0)
 *
 * The byte tokens use GPT-2's byte-to-unicode symbols, so the ByteLevel
 * pre-tokenizer and decoder map text to exactly these ids. There are no
 * merges: every byte is its own token. The placeholders live in the BPE vocab
 * rather than among the added tokens: encoding can never produce them (no
 * merges reach them), a model that samples one still decodes to visible text,
 * and tens of thousands of added tokens would bloat the added-token splitter.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

export type ByteTokenizerFlavour = 'llama' | 'gpt2';

export interface SpecialTokenSpec {
  bos: string;
  eos: string;
  pad: string;
  /** Further special tokens (e.g. chat markers), placed after bos/eos/pad in id order. */
  extra?: string[];
}

export interface ByteTokenizerOptions {
  flavour: ByteTokenizerFlavour;
  /** Total vocabulary size; the vocab is padded up to it with placeholders. */
  vocabSize: number;
  /** Overrides the flavour's special tokens. */
  specialTokens?: SpecialTokenSpec;
  modelMaxLength?: number;
  chatTemplate?: string;
}

export interface ByteTokenizerFiles {
  tokenizerJson: Record<string, unknown>;
  tokenizerConfig: Record<string, unknown>;
  /** Ids of the special tokens, for config.json / generation_config.json. */
  ids: { bos: number; eos: number; pad: number };
}

export const BYTE_TOKEN_COUNT = 256;

const FLAVOUR_SPECIALS: Record<ByteTokenizerFlavour, SpecialTokenSpec> = {
  llama: { bos: '<s>', eos: '</s>', pad: '</s>' },
  gpt2: { bos: '<|endoftext|>', eos: '<|endoftext|>', pad: '<|endoftext|>' },
};

/** Zephyr-style turns delimited by the tokenizer's own bos/eos, as Llama-family chat models do. */
const LLAMA_CHAT_TEMPLATE =
  '{{ bos_token }}{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}{{ eos_token }}\n{% endfor %}' +
  '{% if add_generation_prompt %}<|assistant|>\n{% endif %}';

/** GPT-2 ships no chat template; plain "role: content" lines keep the prompt readable. */
const GPT2_CHAT_TEMPLATE =
  '{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}' +
  '{% if add_generation_prompt %}assistant:{% endif %}';

const FLAVOUR_TEMPLATES: Record<ByteTokenizerFlavour, string> = {
  llama: LLAMA_CHAT_TEMPLATE,
  gpt2: GPT2_CHAT_TEMPLATE,
};

/**
 * GPT-2's reversible byte → printable-unicode map: printable Latin-1 bytes map
 * to themselves, the rest to code points from U+0100 up, in byte order.
 */
export function byteToUnicode(): string[] {
  const printable = (b: number) =>
    (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const out: string[] = new Array(256);
  let next = 256;
  for (let b = 0; b < 256; b++) out[b] = String.fromCodePoint(printable(b) ? b : next++);
  return out;
}

function uniqueSpecials(spec: SpecialTokenSpec): string[] {
  return [...new Set([spec.bos, spec.eos, spec.pad, ...(spec.extra ?? [])])];
}

export function buildByteTokenizer(opts: ByteTokenizerOptions): ByteTokenizerFiles {
  const spec = opts.specialTokens ?? FLAVOUR_SPECIALS[opts.flavour];
  const specials = uniqueSpecials(spec);
  const minimum = BYTE_TOKEN_COUNT + specials.length;
  if (!Number.isInteger(opts.vocabSize) || opts.vocabSize < minimum) {
    throw new Error(
      `byte tokenizer: vocabSize ${opts.vocabSize} is too small; it needs at least ${minimum} ` +
        `(${BYTE_TOKEN_COUNT} bytes + ${specials.length} special tokens)`,
    );
  }

  const vocab: Record<string, number> = {};
  byteToUnicode().forEach((symbol, byte) => (vocab[symbol] = byte));
  const specialId = new Map(specials.map((content, i) => [content, BYTE_TOKEN_COUNT + i]));
  for (let id = minimum, n = 0; id < opts.vocabSize; id++, n++) vocab[`<|unused_${n}|>`] = id;

  const addedTokens = specials.map((content) => ({
    id: specialId.get(content)!,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  }));

  const ids = { bos: specialId.get(spec.bos)!, eos: specialId.get(spec.eos)!, pad: specialId.get(spec.pad)! };
  // Llama tokenizers prepend bos when asked for special tokens; GPT-2's add nothing.
  const postProcessor =
    opts.flavour === 'llama'
      ? {
          type: 'TemplateProcessing',
          single: [{ SpecialToken: { id: spec.bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
          pair: [
            { SpecialToken: { id: spec.bos, type_id: 0 } },
            { Sequence: { id: 'A', type_id: 0 } },
            { SpecialToken: { id: spec.bos, type_id: 1 } },
            { Sequence: { id: 'B', type_id: 1 } },
          ],
          special_tokens: { [spec.bos]: { id: spec.bos, ids: [ids.bos], tokens: [spec.bos] } },
        }
      : { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: true };

  const tokenizerJson = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: addedTokens,
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: postProcessor,
    decoder: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: [],
    },
  };

  const addedTokensDecoder = Object.fromEntries(
    addedTokens.map(({ id, ...rest }) => [String(id), { ...rest }]),
  );
  const tokenizerConfig = {
    add_bos_token: opts.flavour === 'llama',
    add_eos_token: false,
    add_prefix_space: false,
    added_tokens_decoder: addedTokensDecoder,
    bos_token: spec.bos,
    eos_token: spec.eos,
    pad_token: spec.pad,
    unk_token: null,
    // Off so that decoding a stream piece by piece gives the same text as decoding it whole.
    clean_up_tokenization_spaces: false,
    model_max_length: opts.modelMaxLength ?? 2048,
    tokenizer_class: opts.flavour === 'llama' ? 'PreTrainedTokenizerFast' : 'GPT2TokenizerFast',
    chat_template: opts.chatTemplate ?? FLAVOUR_TEMPLATES[opts.flavour],
  };

  return { tokenizerJson, tokenizerConfig, ids };
}

/** Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (created if needed). */
export async function writeByteTokenizer(dir: string, opts: ByteTokenizerOptions): Promise<ByteTokenizerFiles> {
  const files = buildByteTokenizer(opts);
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(files.tokenizerJson));
  await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify(files.tokenizerConfig, null, 2));
  return files;
}
