/**
 * Incremental detokenization for one request, the way TGI and vLLM do it:
 * decode a short window of recent ids with and without the newest token and
 * emit the difference. The window keeps context for decoders whose output
 * depends on neighbours (SentencePiece's leading space), and a piece ending in
 * U+FFFD is held back: with byte-level tokens it is a character whose bytes
 * have not all arrived yet, and the next token usually completes it.
 */
import type { BackboneTokenizer } from '../backbone/tokenizer.js';

const REPLACEMENT = '\uFFFD';

/** How many prompt ids seed the window (vLLM uses the same count). */
const CONTEXT_IDS = 5;

export interface DetokenizerOptions {
  /** Special tokens (eos, …) add no text; default true. */
  skipSpecial?: boolean;
  /** The prompt's ids: the tail of it gives the first generated token its context. */
  promptIds?: ArrayLike<number>;
}

export class IncrementalDetokenizer {
  private readonly ids: number[];
  private readonly skipSpecial: boolean;
  /** ids[prefixOffset..readOffset) were decoded as context and already emitted. */
  private prefixOffset: number;
  private readOffset: number;

  constructor(
    private readonly tokenizer: BackboneTokenizer,
    opts: DetokenizerOptions = {},
  ) {
    const prompt = Array.from(opts.promptIds ?? []);
    this.ids = prompt.slice(Math.max(0, prompt.length - CONTEXT_IDS));
    this.skipSpecial = opts.skipSpecial ?? true;
    this.prefixOffset = 0;
    this.readOffset = this.ids.length;
  }

  /** The text `id` adds; "" while it leaves a character incomplete. */
  push(id: number): string {
    this.ids.push(id);
    const prefixText = this.decode(this.prefixOffset, this.readOffset);
    const fullText = this.decode(this.prefixOffset, this.ids.length);
    if (fullText.length <= prefixText.length || fullText.endsWith(REPLACEMENT)) return '';
    this.prefixOffset = this.readOffset;
    this.readOffset = this.ids.length;
    return fullText.slice(prefixText.length);
  }

  /**
   * Whatever is still held back, once no more tokens will come (bytes that
   * never formed a character come out as U+FFFD, as a full decode shows them).
   */
  flush(): string {
    const prefixText = this.decode(this.prefixOffset, this.readOffset);
    const fullText = this.decode(this.prefixOffset, this.ids.length);
    this.prefixOffset = this.readOffset = this.ids.length;
    return fullText.slice(prefixText.length);
  }

  private decode(from: number, to: number): string {
    // Clean-up rewrites across token boundaries (" ." → "."), so the stream decodes without it.
    return this.tokenizer.decode(this.ids.slice(from, to), { skipSpecial: this.skipSpecial, cleanUpSpaces: false });
  }
}
