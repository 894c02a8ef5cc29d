/**
 * The host-memory device: the KV cache and banks are typed arrays the engine
 * owns, fed to ORT as views. On the CPU provider ORT reads them in place, so
 * nothing crosses anywhere and nothing is counted. On the CUDA provider
 * (host-fed: onnxruntime-node has no CUDA device tensors) every feed goes to
 * the GPU and every output comes back on each run, and all of it is counted.
 */
import * as ort from 'onnxruntime-node';
import { KvPool, type KvShape } from '../kv-pool.js';
import { tensorBytes, type BankFeeder, type Device, type HostRows, type KvPrefix, type KvRowSource, type KvStore, type StampedFeed, type Transfer } from './device.js';

class HostKv implements KvStore {
  readonly pool: KvPool;

  constructor(private readonly shape: KvShape, maxRows: number, maxTokens?: number) {
    this.pool = new KvPool(shape, maxRows, maxTokens);
  }

  get len() { return this.pool.len; }
  get capacity() { return this.pool.capacity; }
  get rows() { return this.pool.rows; }
  get tokensHeld() { return this.pool.tokensHeld; }
  get bytesAllocated() { return this.pool.bytesAllocated; }

  ensure(rows: number, tokens: number): void {
    this.pool.ensure(rows, tokens);
  }

  growAhead(): void {
    this.pool.growAhead();
  }

  addRow(from: KvRowSource): void {
    const src = (from.store as HostKv).pool;
    this.pool.addRow({ keys: src.keys, values: src.values, capacity: src.capacity, row: from.row, segments: from.segments });
  }

  placePrefixes(prefixes: readonly (KvPrefix | null)[], slots: number): void {
    prefixes.forEach((p, b) => {
      if (p) this.pool.writePrefix(b, slots - p.tokens, p);
    });
    this.pool.advance(slots);
  }

  addEmptyRow(): void {
    this.pool.addEmptyRow();
  }

  removeRow(i: number): void {
    this.pool.removeRow(i);
  }

  append(keys: ort.Tensor[], values: ort.Tensor[], steps: number): void {
    const data = (t: ort.Tensor) => t.data as Float32Array;
    this.pool.append(keys.map(data), values.map(data), steps);
  }

  pastSlots(past: boolean, packed?: number): number {
    return past ? packed ?? this.pool.capacity : 0;
  }

  async pastFeeds(past: boolean, _transfer: Transfer, packed?: number): Promise<Record<string, ort.Tensor>> {
    const { layers, kvHeads, headDim } = this.shape;
    const rows = this.pool.rows;
    const cap = this.pastSlots(past, packed);
    const f: Record<string, ort.Tensor> = {};
    for (let l = 0; l < layers; l++) {
      for (const t of ['key', 'value'] as const) {
        const data = !past ? new Float32Array(0) : packed === undefined ? this.pool.pastView(l, t) : this.pool.pastPacked(l, t, packed);
        f[`past_key_values.${l}.${t}`] = new ort.Tensor('float32', data, [rows, kvHeads, cap, headDim]);
      }
    }
    return f;
  }

  async settle(): Promise<void> {}

  release(): void {}
}

export class HostDevice implements Device {
  /** `cuda`: host-fed, so every feed and output crosses the bus and is counted. */
  constructor(readonly name: 'cpu' | 'cuda' = 'cpu') {}

  kv(shape: KvShape, maxRows: number, maxTokens?: number): KvStore {
    return new HostKv(shape, maxRows, maxTokens);
  }

  readonly logitsOnHost = true;

  banks(): BankFeeder {
    return {
      async feeds(feeds: Record<string, StampedFeed>) {
        const f: Record<string, ort.Tensor> = {};
        for (const [name, { tensor }] of Object.entries(feeds)) f[name] = tensor;
        return f;
      },
      release() {},
    };
  }

  async decodeMask(lengths: readonly number[], capacity: number): Promise<ort.Tensor> {
    const B = lengths.length;
    const mask = new BigInt64Array(B * (capacity + 1));
    for (let b = 0; b < B; b++) {
      mask.fill(1n, b * (capacity + 1), b * (capacity + 1) + lengths[b]);
      mask[b * (capacity + 1) + capacity] = 1n;
    }
    return new ort.Tensor('int64', mask, [B, capacity + 1]);
  }

  async run(session: ort.InferenceSession, feeds: Record<string, ort.Tensor>, fetches: string[], transfer: Transfer) {
    const out = await session.run(feeds, fetches);
    if (this.name === 'cuda') {
      for (const t of Object.values(feeds)) transfer.toDevice += tensorBytes(t);
      for (const t of Object.values(out)) transfer.toHost += tensorBytes(t);
    }
    return out;
  }

  async toHost(t: ort.Tensor): Promise<Float32Array> {
    return t.data as Float32Array;
  }

  async hostRows(logits: ort.Tensor, _rows: number[], vocab: number): Promise<HostRows> {
    // Every row's logits are already here.
    return { data: logits.data as Float32Array, offset: (b) => b * vocab };
  }
}
