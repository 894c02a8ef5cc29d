/**
 * Delta banks in row order: for each graph site on each module, every bank
 * of the site laid out as [rows, a, b] so row r of the batch reads slice r;
 * a row's padded axes (a LoRA's rank, a compacter's PHM rank and bottleneck
 * block) smaller than the site's are padded, and a row without a delta there
 * holds the bank's neutral value (0 added, 1 scaled). Nothing here knows a
 * kind: the sites declare their banks (src/deltas/kinds), validation laid
 * each delta out as bank rows.
 *
 * Banks change only when the batch does: `add` writes the joining row's
 * slices, `remove` moves the last row into the hole (as the KV pool does).
 * Each padded axis of a site follows the largest size among its rows both
 * ways: it grows when a larger one joins and falls back when it leaves, so later
 * steps never multiply a departed row's padding. Row capacity grows by
 * doubling and shrinks by half once a quarter is used, and a bank no row
 * writes holds no memory. Feeds are views over the buffers: on the CPU
 * provider ORT reads them in place.
 *
 * This class and the KV store are the only writers of per-row engine memory.
 * The banks stay host arrays on every device (they are small); each feed
 * carries a stamp that changes with its contents, by which a device
 * (device/webgpu.ts) keeps a copy and uploads again only what changed.
 */
import * as ort from 'onnxruntime-node';
import { bankInput, gateInput, paddedAxes, sliceDims, sliceShape, type Axes, type BankSpec, type GraphSite, type SiteLayout } from '../backbone/rewrite/delta-sites.js';
import { graphSite } from '../deltas/kinds/index.js';
import type { DeltaSite, LoadedDelta } from '../deltas/types.js';
import type { StampedFeed } from './device/device.js';

export interface BankOptions {
  /** Rows the batch can hold: row capacity never grows past it. */
  maxRows: number;
  /**
   * Whether the provider takes zero-size tensors. A site no row uses is then
   * fed a zero-size rank, which ORT skips; otherwise (WebGPU) a rank-1 slice
   * of neutral values, which costs a little arithmetic.
   */
  zeroSize: boolean;
}

const tensor = (data: Float32Array, dims: number[]) => new ort.Tensor('float32', data, dims);

/** Stamps of bank contents: every change takes a fresh one, so a device re-uploads a bank only when it changed. */
let lastStamp = 0;

const sameShape = (a: readonly number[], b: readonly number[]) => a.length === b.length && a.every((d, i) => d === b[i]);

/**
 * Copies the block two slices share (each factor the smaller of the two) from
 * `src` at `sOff`, laid out `sShape`, to `dst` at `dOff`, laid out `dShape`:
 * a padded axis inside a product pads each block of it.
 */
function copyBlock(src: Float32Array, sOff: number, sShape: readonly number[], dst: Float32Array, dOff: number, dShape: readonly number[]): void {
  if (sameShape(sShape, dShape)) {
    dst.set(src.subarray(sOff, sOff + sShape.reduce((a, b) => a * b, 1)), dOff);
    return;
  }
  const last = sShape.length - 1;
  const common = sShape.map((d, i) => Math.min(d, dShape[i]));
  if (common.includes(0)) return;
  const stride = (shape: readonly number[]) => shape.map((_, i) => shape.slice(i + 1).reduce((a, b) => a * b, 1));
  const [ss, ds] = [stride(sShape), stride(dShape)];
  const walk = (axis: number, so: number, d: number): void => {
    if (axis === last) {
      dst.set(src.subarray(so, so + common[last]), d);
      return;
    }
    for (let i = 0; i < common[axis]; i++) walk(axis + 1, so + i * ss[axis], d + i * ds[axis]);
  };
  walk(0, sOff, dOff);
}

/** One graph input of one module: [rowsCap, a, b] floats at the site's padded axes. */
class Bank {
  private buf = new Float32Array(0);
  private rowsCap = 0;
  private axes: Axes = {};
  /** Rows whose delta writes this bank; at 0 it holds no memory and is fed idle. */
  writers = 0;
  /** Changes with every write to the buffer. */
  stamp = ++lastStamp;

  constructor(readonly spec: BankSpec, private readonly layout: SiteLayout) {}

  private floats(axes = this.axes): number {
    const [a, b] = sliceDims(this.spec, this.layout, axes);
    return a * b;
  }

  get bytes(): number {
    return this.buf.byteLength;
  }

  get allocated(): boolean {
    return this.rowsCap > 0;
  }

  /** Lays the first `rows` rows out again with room for `rowsCap` rows at `axes`, padding with the neutral value. */
  reshape(rows: number, rowsCap: number, axes: Axes): void {
    if (rowsCap === this.rowsCap && sameShape(sliceShape(this.spec, this.layout, axes), sliceShape(this.spec, this.layout, this.axes))) {
      this.axes = axes;
      return;
    }
    const next = new Float32Array(rowsCap * this.floats(axes));
    if (this.spec.neutral !== 0) next.fill(this.spec.neutral);
    if (this.allocated) for (let r = 0; r < rows; r++) this.copySlice(this.buf, r, this.axes, next, r, axes);
    [this.buf, this.rowsCap, this.axes] = [next, rowsCap, axes];
    this.stamp = ++lastStamp;
  }

  free(): void {
    [this.buf, this.rowsCap, this.axes] = [new Float32Array(0), 0, {}];
    this.stamp = ++lastStamp;
  }

  /** Copies row `sr` of `src` at `sAxes` into row `dr` of `dst` at `dAxes`, up to the smaller size of each axis. */
  private copySlice(src: Float32Array, sr: number, sAxes: Axes, dst: Float32Array, dr: number, dAxes: Axes): void {
    const [sShape, dShape] = [sliceShape(this.spec, this.layout, sAxes), sliceShape(this.spec, this.layout, dAxes)];
    copyBlock(src, sr * this.floats(sAxes), sShape, dst, dr * this.floats(dAxes), dShape);
  }

  /** Writes a row's slice, given at `axes` (each ≤ the bank's), into row `row`. */
  write(row: number, data: Float32Array, axes: Axes): void {
    this.copySlice(data, 0, axes, this.buf, row, this.axes);
    this.stamp = ++lastStamp;
  }

  /** Row `row` back to the neutral value. */
  clear(row: number): void {
    const n = this.floats();
    this.buf.fill(this.spec.neutral, row * n, (row + 1) * n);
    this.stamp = ++lastStamp;
  }

  move(from: number, to: number): void {
    const n = this.floats();
    this.buf.copyWithin(to * n, from * n, (from + 1) * n);
    this.stamp = ++lastStamp;
  }

  /** The first `rows` rows as a feed: [rows, a, b]. */
  feed(rows: number): StampedFeed {
    return { stamp: `bank:${this.stamp}:${rows}`, tensor: tensor(this.buf.subarray(0, rows * this.floats()), [rows, ...sliceDims(this.spec, this.layout, this.axes)]) };
  }
}

/** One site on one module: its banks, the padded axes and the site of each row. */
class SiteBanks {
  readonly banks: Bank[];
  /** Each row's site here, or null. */
  private readonly rows: (DeltaSite | null)[] = [];
  private rowsCap = 0;
  /** Each padded axis at the largest size among the rows (0 while no row uses the site). */
  axes: Axes;
  used = 0;

  constructor(readonly site: GraphSite, readonly layout: SiteLayout, private readonly maxRows: number) {
    this.banks = site.banks.map((spec) => new Bank(spec, layout));
    this.axes = Object.fromEntries(site.banks.flatMap((spec) => paddedAxes(spec, layout)).map((a) => [a, 0]));
  }

  private reshape(): void {
    for (const b of this.banks) if (b.allocated) b.reshape(this.rows.length, this.rowsCap, this.axes);
  }

  /** Each axis at the largest size among the rows; whether any changed. */
  private fitAxes(): boolean {
    const next = Object.fromEntries(Object.keys(this.axes).map((a) => [a, Math.max(0, ...this.rows.map((s) => s?.axes[a] ?? 0))]));
    if (Object.keys(next).every((a) => next[a] === this.axes[a])) return false;
    this.axes = next;
    return true;
  }

  add(site: DeltaSite | null): void {
    this.rows.push(site);
    const rows = this.rows.length;
    if (rows > this.rowsCap) {
      // Rows join one at a time: grow geometrically, or a batch filling up copies O(rows²).
      this.rowsCap = Math.min(this.maxRows, Math.max(rows, 2 * this.rowsCap));
      this.reshape();
    }
    if (!site) return;
    this.used++;
    if (Object.entries(site.axes).some(([a, size]) => size > (this.axes[a] ?? 0)) && this.fitAxes()) this.reshape();
    for (const b of this.banks) {
      const data = site.data[b.spec.key];
      if (!data) continue;
      if (b.writers++ === 0) b.reshape(rows - 1, this.rowsCap, this.axes);
      b.write(rows - 1, data, site.axes);
    }
  }

  /** Removes row `i`, moving the last row into its place. */
  remove(i: number): void {
    const last = this.rows.length - 1;
    const gone = this.rows[i];
    for (const b of this.banks) {
      if (!b.allocated) continue;
      if (i !== last) b.move(last, i);
      b.clear(last);
    }
    this.rows[i] = this.rows[last];
    this.rows.pop();
    if (gone) this.forget(gone);
    // Shrink row capacity geometrically, like a vector: halve once a quarter is used.
    if (this.rowsCap > 1 && this.rows.length <= this.rowsCap / 4) {
      this.rowsCap = Math.max(1, this.rowsCap >> 1);
      this.reshape();
    }
  }

  private forget(site: DeltaSite): void {
    this.used--;
    for (const b of this.banks) if (site.data[b.spec.key] && --b.writers === 0) b.free();
    // The largest size of an axis may have left: fall back to the largest that remains.
    if (Object.entries(site.axes).some(([a, size]) => size >= (this.axes[a] ?? 0)) && this.fitAxes()) this.reshape();
  }

  get bytes(): number {
    return this.banks.reduce((n, b) => n + b.bytes, 0);
  }
}

export class DeltaBanks {
  private readonly groups = new Map<string, SiteBanks>();
  private readonly rows: (LoadedDelta | null)[] = [];
  /** Off and idle feeds, made once per shape. */
  private readonly constant = new Map<string, ort.Tensor>();
  private readonly gated: string[];

  constructor(layouts: readonly SiteLayout[], private readonly opts: BankOptions) {
    for (const layout of layouts) {
      for (const name of layout.sites) this.groups.set(groupKey(layout.module, name), new SiteBanks(graphSite(name), layout, opts.maxRows));
    }
    this.gated = [...new Set([...this.groups.values()].filter((g) => g.site.gated).map((g) => g.site.name))];
  }

  get size(): number {
    return this.rows.length;
  }

  /** Bytes the bank buffers hold. */
  get bytes(): number {
    let n = 0;
    for (const g of this.groups.values()) n += g.bytes;
    return n;
  }

  /** The fed size of a padded axis of a site on a module (0 while no row uses it). */
  axisOf(module: string, site: string, axis = 'rank'): number {
    return this.groups.get(groupKey(module, site))?.axes[axis] ?? 0;
  }

  /** Appends a row carrying `delta` (or none). */
  add(delta: LoadedDelta | null): void {
    const placed = new Map<SiteBanks, DeltaSite>();
    for (const s of delta?.sites ?? []) {
      const group = this.groups.get(groupKey(s.module, s.site));
      if (!group) throw new Error(`no ${s.site} site on ${s.module} in the engine graph`);
      placed.set(group, s);
    }
    this.rows.push(delta);
    for (const g of this.groups.values()) g.add(placed.get(g) ?? null);
  }

  /** Removes row `i` by moving the last row into its place (the KV pool compacts the same way). */
  remove(i: number): void {
    for (const g of this.groups.values()) g.remove(i);
    const last = this.rows.pop()!;
    if (i < this.rows.length) this.rows[i] = last;
  }

  private constantFeed(key: string, dims: number[], value: number): StampedFeed {
    const id = `${key}:${dims.join('x')}`;
    let t = this.constant.get(id);
    if (!t) {
      t = tensor(new Float32Array(dims.reduce((a, b) => a * b, 1)).fill(value), dims);
      this.constant.set(id, t);
    }
    return { stamp: `const:${id}`, tensor: t };
  }

  /**
   * A bank's feed while none of its rows writes it: one slice of its neutral
   * value, broadcast over the batch; every padded axis is 1, or 0 where
   * `empty` allows (the site is unused and the provider takes zero-size tensors).
   */
  private idleFeed(spec: BankSpec, layout: SiteLayout, empty: boolean): StampedFeed {
    const axes = Object.fromEntries(paddedAxes(spec, layout).map((a) => [a, empty ? 0 : 1]));
    return this.constantFeed(`${spec.neutral}`, [1, ...sliceDims(spec, layout, axes)], spec.neutral);
  }

  /** The delta feeds for a step over every row. */
  feeds(): Record<string, ort.Tensor> {
    return Object.fromEntries(Object.entries(this.stampedFeeds()).map(([name, f]) => [name, f.tensor]));
  }

  /** The delta feeds, each with a stamp that changes whenever its contents do (what a device uploads by). */
  stampedFeeds(): Record<string, StampedFeed> {
    const batch = this.rows.length;
    const f: Record<string, StampedFeed> = {};
    // When every row carries the same delta, one slice broadcast over the batch is one GEMM instead of a batched product.
    // (Compared by id and version: each row's delta reaches the worker as its own copy.)
    const first = this.rows[0];
    const uniform = !!first && this.rows.every((r) => r?.id === first.id && r.version === first.version);
    const on = new Set<string>();
    for (const g of this.groups.values()) {
      if (g.used > 0) on.add(g.site.name);
      for (const b of g.banks) {
        f[bankInput(g.layout.module, b.spec.key)] = b.writers === 0
          ? this.idleFeed(b.spec, g.layout, g.used === 0 && this.opts.zeroSize)
          : b.feed(uniform ? 1 : batch);
      }
    }
    for (const name of this.gated) f[gateInput(name)] = { stamp: `const:gate:${on.has(name)}`, tensor: new ort.Tensor('bool', [on.has(name)], []) };
    return f;
  }
}

const groupKey = (module: string, site: string) => `${module}\u0000${site}`;
