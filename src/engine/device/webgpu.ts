/**
 * The WebGPU device (onnxruntime-node's WebGPU execution provider, Dawn over
 * Vulkan): the KV cache and the delta banks stay on the device as
 * `gpu-buffer` tensors that sessions return and take back. A decode step
 * sends token ids, positions and lengths, and fetches the argmax ids (or the
 * logits of the rows that sample); rows joining and leaving, the cache's new
 * slots and its growth are done by the small graphs of row-graphs.ts. A
 * bank is uploaded when its contents change (a row joining or leaving the
 * batch), never on a step that only decodes.
 *
 * Two traps of onnxruntime-node 1.30's WebGPU provider shape this file:
 * reading `.data` of a device tensor aborts the process (so nothing here
 * downloads one: host outputs are asked for by name), and zero-size inputs
 * crash it (so no device tensor is ever empty, and unused LoRA sites are fed
 * a rank-1 neutral slice: BankOptions.zeroSize is false).
 */
import * as ort from 'onnxruntime-node';
import { DataType } from '../../backbone/onnx/graph-builder.js';
import { ensureRuntimeDir } from '../../backbone/session.js';
import { capacityBucket, type KvShape } from '../kv-pool.js';
import { tensorBytes, type BankFeeder, type Device, type HostRows, type KvPrefix, type KvRowSource, type KvStore, type StampedFeed, type Transfer } from './device.js';
import {
  appendOneGraph, appendRunGraph, gatherGraph, joinGraph, maskGraph, packGraph, padGraph, pickRowsGraph, rowGraphNames, uploadGraph, zerosGraph,
} from './row-graphs.js';

const i64 = (values: readonly number[]) => new ort.Tensor('int64', BigInt64Array.from(values, (v) => BigInt(v)), [values.length]);
const f32 = (values: readonly number[]) => new ort.Tensor('float32', Float32Array.from(values), [values.length]);
/** Pad amounts on the slot axis of [rows, heads, slots, D]. */
const slotPads = (before: number, after: number) => i64([0, 0, before, 0, 0, 0, after, 0]);

type Graph = 'zeros' | 'pad' | 'pack' | 'gather' | 'join' | 'joinFirst' | 'appendOne' | 'appendRun' | 'mask' | 'pickRows' | 'uploadFloat' | 'uploadBool' | 'downloadFloat' | 'downloadInt64';

export class WebGpuDevice implements Device {
  readonly name = 'webgpu';
  readonly logitsOnHost = false;
  private readonly sessions = new Map<Graph, Promise<ort.InferenceSession>>();
  /** Per capacity: positions 0..capacity-1 then −1, on the device (row-graphs.ts). */
  private readonly slots = new Map<number, ort.Tensor>();
  /** Uploaded feeds whose stamps say they never change (idle slices, gates), shared by every batch. */
  readonly constants = new Map<string, ort.Tensor>();

  private readonly hostOutputs: Set<string>;

  /** `tensors`: how many KV tensors a batch holds (2 × layers); `hostOutputs`: the engine graph's outputs read on the host. */
  constructor(readonly tensors: number, hostOutputs: readonly string[]) {
    ensureRuntimeDir();
    this.hostOutputs = new Set(hostOutputs);
  }

  private build(name: Graph): Uint8Array {
    const n = this.tensors;
    switch (name) {
      case 'zeros': return zerosGraph();
      case 'pad': return padGraph(n);
      case 'pack': return packGraph(n);
      case 'gather': return gatherGraph(n);
      case 'join': return joinGraph(n, false);
      case 'joinFirst': return joinGraph(n, true);
      case 'appendOne': return appendOneGraph(n);
      case 'appendRun': return appendRunGraph(n);
      case 'mask': return maskGraph();
      case 'pickRows': return pickRowsGraph();
      case 'uploadFloat': return uploadGraph(DataType.FLOAT);
      case 'uploadBool': return uploadGraph(DataType.BOOL);
      case 'downloadFloat': return uploadGraph(DataType.FLOAT);
      case 'downloadInt64': return uploadGraph(DataType.INT64);
    }
  }

  private session(name: Graph): Promise<ort.InferenceSession> {
    let s = this.sessions.get(name);
    if (!s) {
      // Every output stays on the device, except the rows a host asked for.
      const where = name === 'pickRows' || name.startsWith('download') ? 'cpu' : 'gpu-buffer';
      s = ort.InferenceSession.create(this.build(name), { executionProviders: ['webgpu'], logSeverityLevel: 3, preferredOutputLocation: where });
      this.sessions.set(name, s);
    }
    return s;
  }

  /** Runs one of the device's own graphs; returns its outputs in graph order. */
  async runOwn(name: Graph, feeds: Record<string, ort.Tensor>, transfer: Transfer): Promise<ort.Tensor[]> {
    const s = await this.session(name);
    const out = await this.run(s, feeds, [...s.outputNames], transfer);
    return s.outputNames.map((n) => out[n]);
  }

  async run(session: ort.InferenceSession, feeds: Record<string, ort.Tensor>, fetches: string[], transfer: Transfer) {
    for (const t of Object.values(feeds)) if (t.location === 'cpu') transfer.toDevice += tensorBytes(t);
    // onnxruntime-node 1.30 mixes up device outputs when the fetched set changes from run to run (a
    // previous run's buffer is handed to another output): every run of a session fetches all its outputs.
    const all = await session.run(feeds, [...session.outputNames]);
    const out: Record<string, ort.Tensor> = {};
    for (const [name, t] of Object.entries(all)) {
      if (!fetches.includes(name)) {
        t.dispose();
        continue;
      }
      out[name] = t;
      if (t.location === 'cpu') {
        transfer.toHost += tensorBytes(t);
      } else if (this.hostOutputs.has(name)) {
        const [host] = await this.runOwn(t.type === 'int64' ? 'downloadInt64' : 'downloadFloat', { host: t }, transfer);
        t.dispose();
        out[name] = host;
      }
    }
    return out;
  }

  async upload(t: ort.Tensor, transfer: Transfer): Promise<ort.Tensor> {
    const [device] = await this.runOwn(t.type === 'bool' ? 'uploadBool' : 'uploadFloat', { host: t }, transfer);
    return device;
  }

  async slotsFor(capacity: number, transfer: Transfer): Promise<ort.Tensor> {
    let s = this.slots.get(capacity);
    if (!s) {
      s = await this.upload(f32([...Array.from({ length: capacity }, (_, i) => i), -1]), transfer);
      this.slots.set(capacity, s);
    }
    return s;
  }

  kv(shape: KvShape, _maxRows: number, maxTokens?: number): KvStore {
    return new DeviceKv(this, shape, maxTokens);
  }

  async toHost(t: ort.Tensor, transfer: Transfer): Promise<Float32Array> {
    if (t.location === 'cpu') return t.data as Float32Array;
    const [host] = await this.runOwn('downloadFloat', { host: t }, transfer);
    t.dispose();
    return host.data as Float32Array;
  }

  banks(): BankFeeder {
    return new DeviceBanks(this);
  }

  async decodeMask(lengths: readonly number[], capacity: number, transfer: Transfer): Promise<ort.Tensor> {
    const slots = await this.slotsFor(capacity, transfer);
    const [mask] = await this.runOwn('mask', { lengths: f32(lengths), slots }, transfer);
    return mask;
  }

  async hostRows(logits: ort.Tensor, rows: number[], vocab: number, transfer: Transfer): Promise<HostRows> {
    const [picked] = await this.runOwn('pickRows', { t: logits, order: i64(rows) }, transfer);
    const at = new Map(rows.map((b, j) => [b, j * vocab]));
    return {
      data: picked.data as Float32Array,
      offset: (b) => {
        const o = at.get(b);
        if (o === undefined) throw new Error(`row ${b}'s logits were not fetched`);
        return o;
      },
    };
  }
}

/**
 * A batch's KV cache as device tensors, exactly `rows` rows of `capacity`
 * slots (none while the batch is empty or its first chunk has not run).
 * Bookkeeping changes at once; the device work is queued in order and
 * `settle` waits for it, so Batch keeps its synchronous add/remove.
 */
class DeviceKv implements KvStore {
  readonly len: number[] = [];
  capacity = 0;
  /** Keys of every layer, then values; null while no slot is written. */
  private tensors: ort.Tensor[] | null = null;
  private work: Promise<void> = Promise.resolve();
  /** Past feeds made for one run (a first chunk's zeros, a packed copy), freed at the next append. */
  private runPast: ort.Tensor[] = [];
  /** Bytes the queued work moved across (lengths, orders); taken by the next run's stats. */
  private readonly moved: Transfer = { toDevice: 0, toHost: 0 };

  constructor(private readonly device: WebGpuDevice, private readonly shape: KvShape, private readonly maxTokens = Infinity) {}

  get rows(): number { return this.len.length; }
  get tokensHeld(): number { return this.len.reduce((a, b) => a + b, 0); }
  get bytesAllocated(): number {
    const { layers, kvHeads, headDim } = this.shape;
    return this.tensors ? 2 * layers * this.rows * kvHeads * this.capacity * headDim * 4 : 0;
  }

  private queue(op: () => Promise<void>): void {
    this.flush();
    this.work = this.work.then(op);
  }

  /** Queues the pending row moves: at most one of the two kinds is pending at a time. */
  private flush(): void {
    this.flushOrder();
    this.flushJoins();
  }

  /**
   * Rows leaving are gathered out in one run, however many left since the
   * last device work: `order` lists, for each row now, its row in the held tensors.
   */
  private order: number[] | null = null;

  private flushOrder(): void {
    const order = this.order;
    if (!order) return;
    this.order = null;
    this.work = this.work.then(async () => {
      if (!this.tensors) return;
      if (order.length === 0) return this.swap(null);
      this.swap(await this.device.runOwn('gather', { ...this.feedsOf(rowGraphNames.input, this.tensors), order: i64(order) }, this.moved));
    });
  }

  /** Replaces the held tensors with `next`, freeing the old ones. */
  private swap(next: ort.Tensor[] | null): void {
    for (const t of this.tensors ?? []) if (!next?.includes(t)) t.dispose();
    this.tensors = next;
  }

  private feedsOf(prefix: (i: number) => string, ts: ort.Tensor[]): Record<string, ort.Tensor> {
    return Object.fromEntries(ts.map((t, i) => [prefix(i), t]));
  }

  ensure(_rows: number, tokens: number): void {
    const next = Math.max(this.capacity, capacityBucket(tokens, this.maxTokens));
    if (next === this.capacity) return;
    // Rows waiting to join are written at the capacity they were counted in, before the growth.
    this.flush();
    const from = this.capacity;
    this.capacity = next;
    this.queue(async () => {
      if (!this.tensors) return;
      const out = await this.device.runOwn('pad', { ...this.feedsOf(rowGraphNames.input, this.tensors), pads: slotPads(0, next - from) }, this.moved);
      this.swap(out);
    });
  }

  /** Growth is one device copy, not a host pause: nothing to spread. */
  growAhead(): void {}

  /**
   * Rows joining are written in one run, however many joined since the last
   * device work (a prefill group's rows join together): a join per row would
   * write the whole cache once a row, as many caches as rows in all.
   */
  private joins: { src: DeviceKv; row: number; slots: number[] }[] = [];

  addRow(from: KvRowSource): void {
    this.flushOrder();
    // The slots of the row's segments, one after another (its KV prefix, then its prompt).
    const slots = from.segments.flatMap((s) => Array.from({ length: s.tokens }, (_, i) => s.start + i));
    this.ensure(this.rows + 1, slots.length + 1);
    this.len.push(slots.length);
    this.joins.push({ src: from.store as DeviceKv, row: from.row, slots });
  }

  private flushJoins(): void {
    const joins = this.joins;
    if (joins.length === 0) return;
    this.joins = [];
    const capacity = this.capacity;
    // One run per source batch (rows from one prefill group: one run), in the order the rows joined.
    const runs: (typeof joins)[] = [];
    for (const j of joins) {
      if (runs.at(-1)?.[0].src === j.src) runs.at(-1)!.push(j);
      else runs.push([j]);
    }
    this.work = this.work.then(async () => {
      for (const run of runs) {
        const src = run[0].src;
        await src.settle();
        if (!src.tensors) throw new Error('a joining row\'s K/V are not on the device');
        const srcCapacity = src.tensors[0].dims[2];
        const index = new BigInt64Array(run.length * capacity);
        run.forEach(({ row, slots }, j) => {
          const base = row * srcCapacity;
          // Slots past the row's length read its slot 0 (any slot would do): the graph zeroes them.
          index.fill(BigInt(base), j * capacity, (j + 1) * capacity);
          slots.forEach((s, k) => { index[j * capacity + k] = BigInt(base + s); });
        });
        const feeds: Record<string, ort.Tensor> = {
          ...this.feedsOf((i) => `src.${i}`, src.tensors),
          index: new ort.Tensor('int64', index, [run.length, capacity]),
          lengths: f32(run.map((j) => j.slots.length)),
          slots: await this.device.slotsFor(capacity, this.moved),
        };
        const out = this.tensors
          ? await this.device.runOwn('join', { ...feeds, ...this.feedsOf(rowGraphNames.input, this.tensors) }, this.moved)
          : await this.device.runOwn('joinFirst', feeds, this.moved);
        this.swap(out);
      }
    });
  }

  addEmptyRow(): void {
    this.len.push(0);
  }

  /** The prefixes are written into host blocks of the whole cache, uploaded once (rows · capacity slots per layer-tensor). */
  placePrefixes(prefixes: readonly (KvPrefix | null)[], slots: number): void {
    const { layers, kvHeads, headDim } = this.shape;
    const rows = this.rows;
    const capacity = this.capacity;
    for (let b = 0; b < rows; b++) this.len[b] += slots;
    this.queue(async () => {
      if (this.tensors) throw new Error('prefixes go into a fresh KV store, before its first run');
      const blocks: ort.Tensor[] = [];
      for (const kind of ['keys', 'values'] as const) {
        for (let l = 0; l < layers; l++) {
          const block = new Float32Array(rows * kvHeads * capacity * headDim);
          prefixes.forEach((p, b) => {
            if (!p) return;
            const n = p.tokens * headDim;
            for (let h = 0; h < kvHeads; h++) {
              const s = (l * kvHeads + h) * n;
              block.set(p[kind].subarray(s, s + n), ((b * kvHeads + h) * capacity + slots - p.tokens) * headDim);
            }
          });
          blocks.push(await this.device.upload(new ort.Tensor('float32', block, [rows, kvHeads, capacity, headDim]), this.moved));
        }
      }
      this.swap(blocks);
    });
  }

  removeRow(i: number): void {
    this.flushJoins();
    const last = this.rows - 1;
    this.len[i] = this.len[last];
    this.len.pop();
    this.order ??= Array.from({ length: last + 1 }, (_, r) => r);
    this.order[i] = this.order[last];
    this.order.pop();
    if (this.rows === 0) this.capacity = 0;
  }

  append(keys: ort.Tensor[], values: ort.Tensor[], steps: number): void {
    const fresh = [...keys, ...values];
    const lengths = this.len.slice();
    const capacity = this.capacity;
    // A row at the capped capacity is at the model's context: this step is its last, and its token is not kept (no slot matches it).
    for (let b = 0; b < this.rows; b++) this.len[b] = Math.min(this.len[b] + steps, capacity);
    if (steps > 1 && lengths[0] + steps > capacity) throw new Error(`a prefill run of ${steps} slots after ${lengths[0]} passes the KV capacity ${capacity}`);
    const uniform = lengths.every((l) => l === lengths[0]);
    if (!uniform && steps !== 1) throw new Error('rows of different lengths append one slot at a time');
    this.queue(async () => {
      const news = this.feedsOf(rowGraphNames.fresh, fresh);
      const slots = await this.device.slotsFor(capacity, this.moved);
      let out: ort.Tensor[];
      if (!this.tensors) {
        // The first run of a prefill group: its slots are the cache, padded to the capacity.
        out = await this.device.runOwn('pad', { ...this.feedsOf(rowGraphNames.input, fresh), pads: slotPads(lengths[0] ?? 0, capacity - steps - (lengths[0] ?? 0)) }, this.moved);
      } else if (uniform && lengths[0] + steps > capacity) {
        // Every row at the capped capacity: no slot to write (the rows end this step).
        out = this.tensors;
      } else if (uniform) {
        const first = lengths[0];
        out = await this.device.runOwn('appendRun', {
          ...this.feedsOf(rowGraphNames.input, this.tensors), ...news,
          pads: slotPads(first, capacity - first - steps), centre: f32([first + (steps - 1) / 2]), half: f32([steps / 2]), slots,
        }, this.moved);
      } else {
        out = await this.device.runOwn('appendOne', { ...this.feedsOf(rowGraphNames.input, this.tensors), ...news, lengths: f32(lengths), slots }, this.moved);
      }
      this.swap(out);
      for (const t of fresh) t.dispose();
      for (const t of this.runPast) t.dispose();
      this.runPast = [];
    });
  }

  pastSlots(past: boolean, packed?: number): number {
    return past ? packed ?? this.capacity : 1;
  }

  async pastFeeds(past: boolean, transfer: Transfer, packed?: number): Promise<Record<string, ort.Tensor>> {
    const { layers, kvHeads, headDim } = this.shape;
    if (past && !this.tensors) throw new Error('no K/V on the device to feed as past');
    let fed: ort.Tensor[];
    if (!past) {
      // A first chunk's past: one zero slot made on the device, which the mask hides.
      const [zeros] = await this.device.runOwn('zeros', { shape: i64([this.rows, kvHeads, 1, headDim]) }, transfer);
      fed = new Array<ort.Tensor>(2 * layers).fill(zeros);
      this.runPast = [zeros];
    } else if (packed !== undefined) {
      fed = await this.device.runOwn('pack', { ...this.feedsOf(rowGraphNames.input, this.tensors!), tokens: i64([packed]) }, transfer);
      this.runPast = fed;
    } else {
      fed = this.tensors!;
    }
    const f: Record<string, ort.Tensor> = {};
    for (let l = 0; l < layers; l++) {
      f[`past_key_values.${l}.key`] = fed[l];
      f[`past_key_values.${l}.value`] = fed[layers + l];
    }
    return f;
  }

  /** Waits for queued device work, adding what it moved to `transfer`; a failure surfaces once, then the queue starts clean. */
  async settle(transfer?: Transfer): Promise<void> {
    this.flush();
    const work = this.work;
    this.work = Promise.resolve();
    try {
      await work;
    } finally {
      if (transfer) {
        transfer.toDevice += this.moved.toDevice;
        transfer.toHost += this.moved.toHost;
        this.moved.toDevice = 0;
        this.moved.toHost = 0;
      }
    }
  }

  release(): void {
    this.queue(async () => {
      this.swap(null);
      for (const t of this.runPast) t.dispose();
      this.runPast = [];
    });
    void this.settle().catch(() => {});
  }
}

/** A batch's bank feeds on the device, re-uploaded only when their stamp changes. */
class DeviceBanks implements BankFeeder {
  private readonly held = new Map<string, { stamp: string; tensor: ort.Tensor }>();

  constructor(private readonly device: WebGpuDevice) {}

  async feeds(feeds: Record<string, StampedFeed>, transfer: Transfer): Promise<Record<string, ort.Tensor>> {
    const out: Record<string, ort.Tensor> = {};
    for (const [name, { tensor, stamp }] of Object.entries(feeds)) {
      if (stamp.startsWith('const:')) {
        let t = this.device.constants.get(stamp);
        if (!t) {
          t = await this.device.upload(tensor, transfer);
          this.device.constants.set(stamp, t);
        }
        out[name] = t;
        continue;
      }
      const h = this.held.get(name);
      if (h?.stamp === stamp) {
        out[name] = h.tensor;
        continue;
      }
      h?.tensor.dispose();
      const t = await this.device.upload(tensor, transfer);
      this.held.set(name, { stamp, tensor: t });
      out[name] = t;
    }
    // A bank fed idle now (its rows left) frees its device copy.
    for (const [name, h] of this.held) {
      if (feeds[name]?.stamp.startsWith('const:')) {
        h.tensor.dispose();
        this.held.delete(name);
      }
    }
    return out;
  }

  release(): void {
    for (const h of this.held.values()) h.tensor.dispose();
    this.held.clear();
  }
}
