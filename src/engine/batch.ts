/**
 * The rows of one engine run and everything kept in their order: their KV
 * cache and their slices of the delta banks. One `add` and one `remove` keep
 * the three in step (a removed row's place is taken by the last row, in the
 * rows, the KV pool and every bank alike), as vLLM's punica wrapper rebuilds
 * a batch's adapter mapping from its rows in `update_metadata`. The engine
 * runs two kinds of batch: the decode batch, and a prefill group whose rows
 * move into it once their prompt is done.
 */
import * as ort from 'onnxruntime-node';
import type { DecoderIO } from '../backbone/decoder-io.js';
import type { SiteLayout } from '../backbone/rewrite/delta-sites.js';
import type { LoadedDelta } from '../deltas/types.js';
import { DeltaBanks, type BankOptions } from './banks.js';
import { KvPool, type KvSegment } from './kv-pool.js';

export interface BatchRow {
  readonly req: { readonly delta: LoadedDelta | null };
}

/** A row's K/V in another batch: row `index`'s slots, segment after segment (its KV prefix, its prompt). */
export interface KvSource {
  batch: Batch<BatchRow>;
  index: number;
  segments: readonly KvSegment[];
}

export class Batch<R extends BatchRow> {
  readonly rows: R[] = [];
  private readonly kv: KvPool;
  private readonly banks: DeltaBanks;

  /** `maxTokens`: the most KV slots a row may hold (the model's context less one). */
  constructor(private readonly io: DecoderIO, layouts: readonly SiteLayout[], opts: BankOptions & { maxTokens?: number }) {
    this.kv = new KvPool(io, opts.maxRows, opts.maxTokens);
    this.banks = new DeltaBanks(layouts, opts);
  }

  get size(): number {
    return this.rows.length;
  }

  /** Adds a row, its K/V copied from `from` or empty (a prefill group fills it chunk by chunk). */
  add(row: R, from?: KvSource): void {
    if (from) {
      const src = from.batch.kv;
      this.kv.addRow({ keys: src.keys, values: src.values, capacity: src.capacity, row: from.index, segments: from.segments });
    } else {
      this.kv.addEmptyRow();
    }
    this.banks.add(row.req.delta);
    this.rows.push(row);
  }

  /** Removes row `i`: the last row takes its place everywhere. */
  remove(i: number): R {
    const row = this.rows[i];
    const last = this.rows.pop()!;
    if (i < this.rows.length) this.rows[i] = last;
    this.kv.removeRow(i);
    this.banks.remove(i);
    return row;
  }

  /** KV slots each row holds now. */
  get lengths(): readonly number[] {
    return this.kv.len;
  }

  get kvCapacity(): number {
    return this.kv.capacity;
  }

  get kvTokens(): number {
    return this.kv.tokensHeld;
  }

  get kvBytes(): number {
    return this.kv.bytesAllocated;
  }

  get bankBytes(): number {
    return this.banks.bytes;
  }

  /** The fed rank of a site on a module (0 while no row uses it). */
  rankOf(module: string, site: string): number {
    return this.banks.rankOf(module, site);
  }

  /** Room for every row to hold `tokens` slots. */
  reserve(tokens: number): void {
    this.kv.ensure(this.rows.length, tokens);
  }

  /**
   * Puts each row's KV prefix (prompt learning) in its first `slots` slots,
   * right-aligned so it ends where the prompt's slots begin; a row without one
   * leaves them empty (the attention mask hides them). Call on a fresh batch
   * after `reserve`.
   */
  placePrefixes(slots: number): void {
    this.rows.forEach((r, b) => {
      const p = r.req.delta?.prefix;
      if (p) this.kv.writePrefix(b, slots - p.tokens, p);
    });
    this.kv.advance(slots);
  }

  /** Before a decode step: room for one more token per row, the next capacity bucket filled ahead of need. */
  reserveNextToken(): void {
    this.kv.growAhead();
    this.kv.ensure(this.rows.length, Math.max(...this.kv.len) + 1);
  }

  /** Writes a run's new K/V ([rows, kvHeads, steps, D] per layer) after each row's slots. */
  append(keys: Float32Array[], values: Float32Array[], steps = 1): void {
    this.kv.append(keys, values, steps);
  }

  /**
   * The delta feeds and the past K/V for a run over every row; without `past`, a first prefill
   * chunk's empty past. `packed`: feed only each row's first `packed` slots (a copy), not the whole capacity.
   */
  feeds(past: boolean, packed?: number): Record<string, ort.Tensor> {
    const { layers, kvHeads, headDim } = this.io;
    const rows = this.rows.length;
    const cap = past ? packed ?? this.kv.capacity : 0;
    const f = this.banks.feeds();
    for (let l = 0; l < layers; l++) {
      for (const t of ['key', 'value'] as const) {
        const data = !past ? new Float32Array(0) : packed === undefined ? this.kv.pastView(l, t) : this.kv.pastPacked(l, t, packed);
        f[`past_key_values.${l}.${t}`] = new ort.Tensor('float32', data, [rows, kvHeads, cap, headDim]);
      }
    }
    return f;
  }
}
