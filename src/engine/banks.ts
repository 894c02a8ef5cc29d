/**
 * Delta banks in row order: for each delta site of the engine graph, the
 * factors of every row's delta laid out as [batch, …] so row b of the batch
 * reads slice b, with smaller ranks zero-padded to the site's rank.
 *
 * Banks change only when the batch does: setRow when a request joins,
 * moveRow when the batch is compacted, clearRow when it leaves. Each touches
 * one row's slices; a full rebuild of a site happens only when its rank grows.
 * Feeds are views over the bank buffers: on the CPU provider ORT reads them
 * in place.
 */
import * as ort from 'onnxruntime-node';
import { ACTIVATIONS, ADAPTERS_ON, siteInput, type SiteLayout } from '../backbone/rewrite/delta-sites.js';
import type { AdapterSite, BiasSite, LoadedDelta, LoraSite } from '../deltas/types.js';

type Dims = readonly number[];

/** A [rows, a, rank, b]-shaped buffer whose rank can grow, keeping each row's data. */
class RankedBank {
  rank = 0;
  private buf = new Float32Array(0);
  private rowsCap = 0;

  /** rowLen(rank) = floats per row; the padded rank axis is `inner` for [a, R] or `outer` for [R, b]. */
  constructor(private readonly a: number, private readonly b: number, private readonly rankAxis: 'inner' | 'outer') {}

  private rowLen(rank = this.rank) {
    return this.rankAxis === 'inner' ? this.a * rank : rank * this.b;
  }

  ensure(rows: number, rank: number): void {
    if (rank <= this.rank && rows <= this.rowsCap) return;
    const newRank = Math.max(rank, this.rank);
    // Rows join one at a time: grow geometrically, or a batch filling up copies O(rows²).
    const newRows = rows > this.rowsCap ? Math.max(rows, this.rowsCap * 2) : this.rowsCap;
    const next = new Float32Array(newRows * this.rowLen(newRank));
    if (this.rank > 0) {
      for (let r = 0; r < this.rowsCap; r++) this.copyRowInto(this.buf, r, this.rank, next, r, newRank);
    }
    this.buf = next;
    this.rank = newRank;
    this.rowsCap = newRows;
  }

  private copyRowInto(src: Float32Array, sr: number, sRank: number, dst: Float32Array, dr: number, dRank: number) {
    const sOff = sr * this.rowLen(sRank);
    const dOff = dr * this.rowLen(dRank);
    if (this.rankAxis === 'outer' || sRank === dRank) {
      dst.set(src.subarray(sOff, sOff + this.rowLen(sRank)), dOff);
    } else {
      for (let i = 0; i < this.a; i++) dst.set(src.subarray(sOff + i * sRank, sOff + (i + 1) * sRank), dOff + i * dRank);
    }
  }

  /** Writes `data` ([a, r] or [r, b]) into row `row`, zero-padding to the bank's rank. */
  write(row: number, data: Float32Array, r: number): void {
    const off = row * this.rowLen();
    this.buf.fill(0, off, off + this.rowLen());
    if (this.rankAxis === 'outer') this.buf.set(data.subarray(0, r * this.b), off);
    else for (let i = 0; i < this.a; i++) this.buf.set(data.subarray(i * r, (i + 1) * r), off + i * this.rank);
  }

  clear(row: number): void {
    if (this.rank === 0 || row >= this.rowsCap) return;
    this.buf.fill(0, row * this.rowLen(), (row + 1) * this.rowLen());
  }

  move(from: number, to: number): void {
    if (this.rank === 0) return;
    const len = this.rowLen();
    this.buf.copyWithin(to * len, from * len, (from + 1) * len);
  }

  view(rows: number): Float32Array {
    return this.buf.subarray(0, rows * this.rowLen());
  }
}

/** A [rows, 1, n] bank with no rank axis (biases, activation selectors). */
class FlatBank {
  private buf = new Float32Array(0);
  private rowsCap = 0;
  used = 0;

  constructor(private readonly n: number) {}

  ensure(rows: number): void {
    if (rows <= this.rowsCap) return;
    const cap = Math.max(rows, this.rowsCap * 2);
    const next = new Float32Array(cap * this.n);
    next.set(this.buf);
    this.buf = next;
    this.rowsCap = cap;
  }

  write(row: number, data: Float32Array | null, add?: Float32Array | null): void {
    const off = row * this.n;
    this.buf.fill(0, off, off + this.n);
    if (data) this.buf.set(data, off);
    if (add) for (let i = 0; i < this.n; i++) this.buf[off + i] += add[i];
  }

  clear(row: number): void {
    if (row < this.rowsCap) this.buf.fill(0, row * this.n, (row + 1) * this.n);
  }

  move(from: number, to: number): void {
    if (from < this.rowsCap) this.buf.copyWithin(to * this.n, from * this.n, (from + 1) * this.n);
  }

  view(rows: number): Float32Array {
    return this.buf.subarray(0, rows * this.n);
  }
}

interface SiteBanks {
  layout: SiteLayout;
  loraA?: RankedBank;
  loraB?: RankedBank;
  down?: RankedBank;
  downBias?: RankedBank;
  up?: RankedBank;
  bias?: FlatBank;
  /** Rows whose delta uses each part of this site; at 0 the part is fed empty. */
  loraRows: number;
  adapterRows: number;
  biasRows: number;
}

const tensor = (data: Float32Array, dims: Dims) => new ort.Tensor('float32', data, dims as number[]);

export class DeltaBanks {
  private readonly sites = new Map<string, SiteBanks>();
  private readonly rows: (LoadedDelta | null)[] = [];
  private readonly activation = new FlatBank(ACTIVATIONS.length);
  private readonly hasAdapterSites: boolean;
  private readonly empty = new Map<string, ort.Tensor>();

  constructor(layouts: SiteLayout[]) {
    for (const layout of layouts) {
      const { inFeatures: i, outFeatures: o, kinds } = layout;
      this.sites.set(layout.module, {
        layout,
        loraRows: 0, adapterRows: 0, biasRows: 0,
        ...(kinds.includes('lora') ? { loraA: new RankedBank(i, 0, 'inner'), loraB: new RankedBank(0, o, 'outer') } : {}),
        ...(kinds.includes('adapter')
          ? { down: new RankedBank(o, 0, 'inner'), downBias: new RankedBank(1, 0, 'inner'), up: new RankedBank(0, o, 'outer') }
          : {}),
        ...(kinds.includes('bias') ? { bias: new FlatBank(o) } : {}),
      });
    }
    this.hasAdapterSites = layouts.some((l) => l.kinds.includes('adapter'));
  }

  /** Places a delta (or none) in row `row`; rows must be filled in order, without holes. */
  setRow(row: number, delta: LoadedDelta | null): void {
    if (row > this.rows.length) throw new Error(`bank row ${row} would leave a hole (batch has ${this.rows.length})`);
    if (row < this.rows.length) this.clearRow(row);
    this.rows[row] = delta;
    const need = this.rows.length;
    if (!delta) return;
    const biasBySite = new Map<string, Float32Array[]>();
    for (const s of delta.sites) {
      const banks = this.sites.get(s.module);
      if (!banks) throw new Error(`no delta site for ${s.module} in the engine graph`);
      if (s.kind === 'lora') this.placeLora(banks, row, need, s);
      else if (s.kind === 'adapter') {
        this.placeAdapter(banks, row, need, s);
        biasBySite.set(s.module, [...(biasBySite.get(s.module) ?? []), s.upBias]);
      } else biasBySite.set(s.module, [...(biasBySite.get(s.module) ?? []), (s as BiasSite).bias]);
    }
    for (const [module, parts] of biasBySite) {
      const banks = this.sites.get(module)!;
      if (!banks.bias) throw new Error(`no bias site for ${module} in the engine graph`);
      banks.bias.ensure(need);
      banks.bias.write(row, parts[0], parts[1] ?? null);
      banks.biasRows++;
    }
    if (delta.activation && this.hasAdapterSites) {
      this.activation.ensure(need);
      const onehot = new Float32Array(ACTIVATIONS.length);
      onehot[ACTIVATIONS.indexOf(delta.activation)] = 1;
      this.activation.write(row, onehot);
      this.activation.used++;
    }
  }

  private placeLora(banks: SiteBanks, row: number, rows: number, s: LoraSite) {
    banks.loraA!.ensure(rows, s.rank);
    banks.loraB!.ensure(rows, s.rank);
    banks.loraA!.write(row, s.a, s.rank);
    banks.loraB!.write(row, s.b, s.rank);
    banks.loraRows++;
  }

  private placeAdapter(banks: SiteBanks, row: number, rows: number, s: AdapterSite) {
    for (const bank of [banks.down!, banks.downBias!, banks.up!]) bank.ensure(rows, s.bottleneck);
    banks.down!.write(row, s.down, s.bottleneck);
    banks.downBias!.write(row, s.downBias, s.bottleneck);
    banks.up!.write(row, s.up, s.bottleneck);
    banks.adapterRows++;
  }

  private forEachBank(fn: (b: RankedBank | FlatBank) => void) {
    for (const s of this.sites.values()) {
      for (const b of [s.loraA, s.loraB, s.down, s.downBias, s.up, s.bias]) if (b) fn(b);
    }
    fn(this.activation);
  }

  private clearRow(row: number): void {
    const delta = this.rows[row];
    if (!delta) return;
    const touched = new Set<string>();
    for (const s of delta.sites) {
      const banks = this.sites.get(s.module)!;
      if (s.kind === 'lora') banks.loraRows--;
      if (s.kind === 'adapter') banks.adapterRows--;
      if (s.kind !== 'lora' && !touched.has(s.module)) {
        banks.biasRows--;
        touched.add(s.module);
      }
    }
    if (delta.activation && this.hasAdapterSites) this.activation.used--;
    this.forEachBank((b) => b.clear(row));
    this.rows[row] = null;
  }

  /** Removes row `row` by moving the last row into its place (the KV pool compacts the same way). */
  removeRow(row: number): void {
    const last = this.rows.length - 1;
    this.clearRow(row);
    if (row !== last) {
      this.forEachBank((b) => b.move(last, row));
      this.rows[row] = this.rows[last];
      this.forEachBank((b) => b.clear(last));
    }
    this.rows.length = last;
  }

  private emptyTensor(key: string, dims: Dims): ort.Tensor {
    let t = this.empty.get(key);
    if (!t) {
      t = tensor(new Float32Array(dims.reduce((a, b) => a * b, 1)), dims);
      this.empty.set(key, t);
    }
    return t;
  }

  /** The delta feeds for a step over rows 0..batch-1. */
  feeds(batch: number): Record<string, ort.Tensor> {
    if (batch !== this.rows.length) throw new Error(`banks hold ${this.rows.length} rows, step has ${batch}`);
    const f: Record<string, ort.Tensor> = {};
    // Rows that joined without touching a bank still need their (zero) slice in it.
    this.forEachBank((b) => (b instanceof RankedBank ? b.rank > 0 && b.ensure(batch, b.rank) : b.ensure(batch)));
    const uniform = this.rows.length > 0 && this.rows.every((r) => r === this.rows[0]);
    for (const [m, s] of this.sites) {
      const { inFeatures: i, outFeatures: o } = s.layout;
      if (uniform && s.loraA && s.loraRows === batch) {
        // Every row carries the same LoRA here: one GEMM against row 0's slice, broadcast over the batch.
        f[siteInput.loraA(m)] = tensor(s.loraA.view(1), [1, i, s.loraA.rank]);
        f[siteInput.loraB(m)] = tensor(s.loraB!.view(1), [1, s.loraB!.rank, o]);
      } else if (s.loraA) {
        const on = s.loraRows > 0;
        f[siteInput.loraA(m)] = on ? tensor(s.loraA.view(batch), [batch, i, s.loraA.rank]) : this.emptyTensor(`a${i}`, [1, i, 0]);
        f[siteInput.loraB(m)] = on ? tensor(s.loraB!.view(batch), [batch, s.loraB!.rank, o]) : this.emptyTensor(`b${o}`, [1, 0, o]);
      }
      if (s.down) {
        const on = s.adapterRows > 0;
        const r = s.down.rank;
        f[siteInput.adapterDown(m)] = on ? tensor(s.down.view(batch), [batch, o, r]) : this.emptyTensor(`d${o}`, [1, o, 0]);
        f[siteInput.adapterDownBias(m)] = on ? tensor(s.downBias!.view(batch), [batch, 1, r]) : this.emptyTensor('db', [1, 1, 0]);
        f[siteInput.adapterUp(m)] = on ? tensor(s.up!.view(batch), [batch, r, o]) : this.emptyTensor(`u${o}`, [1, 0, o]);
      }
      if (s.bias) {
        f[siteInput.bias(m)] = s.biasRows > 0 ? tensor(s.bias.view(batch), [batch, 1, o]) : this.emptyTensor(`z${o}`, [1, 1, o]);
      }
    }
    if (this.hasAdapterSites) {
      const on = [...this.sites.values()].some((s) => s.adapterRows > 0);
      f[ADAPTERS_ON] = new ort.Tensor('bool', [on], []);
      for (let k = 0; k < ACTIVATIONS.length; k++) {
        f[siteInput.activation(ACTIVATIONS[k])] = this.activation.used > 0
          ? tensor(this.activationColumn(batch, k), [batch, 1, 1])
          : this.emptyTensor('act', [1, 1, 1]);
      }
    }
    return f;
  }

  private activationColumn(batch: number, k: number): Float32Array {
    const all = this.activation.view(batch);
    const col = new Float32Array(batch);
    for (let b = 0; b < batch; b++) col[b] = all[b * ACTIVATIONS.length + k];
    return col;
  }
}
