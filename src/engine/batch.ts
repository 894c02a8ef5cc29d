/**
 * The rows of one engine run and everything kept in their order: their KV
 * cache and their slices of the delta banks. One `add` and one `remove` keep
 * the three in step (a removed row's place is taken by the last row, in the
 * rows, the KV pool and every bank alike), as vLLM's punica wrapper rebuilds
 * a batch's adapter mapping from its rows in `update_metadata`. The engine
 * runs two kinds of batch: the decode batch, and a prefill group whose rows
 * move into it once their prompt is done. Where the memory lives (host
 * arrays or device tensors) is the Device's business (device/).
 */
import * as ort from 'onnxruntime-node';
import type { DecoderIO } from '../backbone/decoder-io.js';
import type { SiteLayout } from '../backbone/rewrite/delta-sites.js';
import type { LoadedDelta } from '../deltas/types.js';
import { DeltaBanks, type BankOptions } from './banks.js';
import type { BankFeeder, Device, KvStore, Transfer } from './device/device.js';
import type { KvSegment } from './kv-pool.js';

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
  private readonly kv: KvStore;
  private readonly banks: DeltaBanks;
  private readonly bankFeeds: BankFeeder;

  /** `maxTokens`: the most KV slots a row may hold (the model's context less one). */
  constructor(device: Device, io: DecoderIO, layouts: readonly SiteLayout[], opts: BankOptions & { maxTokens?: number }) {
    this.kv = device.kv(io, opts.maxRows, opts.maxTokens);
    this.banks = new DeltaBanks(layouts, opts);
    this.bankFeeds = device.banks();
  }

  get size(): number {
    return this.rows.length;
  }

  /** Adds a row, its K/V copied from `from` or empty (a prefill group fills it chunk by chunk). */
  add(row: R, from?: KvSource): void {
    if (from) {
      this.kv.addRow({ store: from.batch.kv, row: from.index, segments: from.segments });
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

  /** The fed size of a padded axis (default the rank) of a site on a module (0 while no row uses it). */
  axisOf(module: string, site: string, axis = 'rank'): number {
    return this.banks.axisOf(module, site, axis);
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
    this.kv.placePrefixes(this.rows.map((r) => r.req.delta?.prefix ?? null), slots);
  }

  /** Before a decode step: room for one more token per row, the next capacity bucket filled ahead of need. */
  reserveNextToken(): void {
    this.kv.growAhead();
    this.kv.ensure(this.rows.length, Math.max(...this.kv.len) + 1);
  }

  /** Writes a run's new K/V ([rows, kvHeads, steps, D] per layer, as the session returned them) after each row's slots. */
  append(keys: ort.Tensor[], values: ort.Tensor[], steps = 1): void {
    this.kv.append(keys, values, steps);
  }

  /**
   * The delta feeds and the past K/V for a run over every row; without `past`, a first prefill
   * chunk's empty past. `packed`: feed only each row's first `packed` slots (a copy), not the whole capacity.
   */
  async feeds(past: boolean, transfer: Transfer, packed?: number): Promise<Record<string, ort.Tensor>> {
    await this.kv.settle(transfer);
    return { ...(await this.bankFeeds.feeds(this.banks.stampedFeeds(), transfer)), ...(await this.kv.pastFeeds(past, transfer, packed)) };
  }

  /** Past slots a run's feeds hold (the attention mask's past columns). */
  pastSlots(past: boolean, packed?: number): number {
    return this.kv.pastSlots(past, packed);
  }

  /** Waits for the device's row moves, adding what crossed to `transfer`. */
  settle(transfer: Transfer): Promise<void> {
    return this.kv.settle(transfer);
  }

  /** Frees the batch's device memory (its rows have moved on). */
  release(): void {
    this.kv.release();
    this.bankFeeds.release();
  }
}
