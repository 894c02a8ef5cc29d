/**
 * The KV cache of the running batch, in buffers the engine owns: per layer a
 * [rows, kvHeads, capacity, headDim] block for keys and one for values. Row b
 * holds its tokens in slots 0..len[b]-1; the attention mask hides the rest.
 * The buffers are fed to ORT as `past` in place (a view, no copy), the graph
 * returns only the step's new K/V, and the engine writes that one slot per row.
 *
 * Capacity grows in buckets so shapes (and ORT's kernels) rarely change;
 * removing a row moves the last row into its place, like the banks. Growing
 * means copying the whole cache into a bigger buffer; done in one step that is
 * a pause of up to several steps' time, so the copy starts ahead of need and
 * is spread, a few layer-tensors a step, over GROWTH_STEPS steps.
 *
 * Capacity never passes `maxTokens` (the model's context less the one token a
 * decode step adds): the graph sees a key length of capacity + new tokens, and
 * models such as GPT-2 slice a fixed causal-bias buffer of exactly
 * `n_positions` by it, so one slot more fails the step.
 */
export function capacityBucket(tokens: number, maxTokens = Infinity): number {
  let c = 64;
  while (c < tokens) c *= 2;
  return Math.min(c, Math.max(maxTokens, 1));
}

/** Steps over which a capacity growth's copy is spread. */
export const GROWTH_STEPS = 16;
/** Free slots left when the spread copy starts (the longest row gains one a step). */
export const GROWTH_LEAD = GROWTH_STEPS + 8;

/** The next capacity bucket, filled ahead of need: buffers[t] is layer-tensor t (keys, then values) once copied. */
interface Growth {
  capacity: number;
  rowsCap: number;
  buffers: (Float32Array | null)[];
  done: number;
}

/** `tokens` slots from slot `start`. */
export interface KvSegment {
  start: number;
  tokens: number;
}

export interface KvShape {
  layers: number;
  kvHeads: number;
  headDim: number;
}

export class KvPool {
  keys: Float32Array[] = [];
  values: Float32Array[] = [];
  readonly len: number[] = [];
  capacity = 0;
  private rowsCap = 0;
  private growth: Growth | null = null;

  /**
   * `maxRows` caps the geometric growth of the row capacity (the engine's max batch);
   * `maxTokens` caps the capacity (slots per row).
   */
  constructor(readonly shape: KvShape, private readonly maxRows = Infinity, readonly maxTokens = Infinity) {}

  get rows(): number {
    return this.len.length;
  }

  /** Floats per row per layer-tensor. */
  private rowFloats(capacity = this.capacity): number {
    return this.shape.kvHeads * capacity * this.shape.headDim;
  }

  get bytesAllocated(): number {
    const growing = this.growth?.buffers.reduce((n, b) => n + (b?.byteLength ?? 0), 0) ?? 0;
    return 2 * this.shape.layers * this.rowsCap * this.rowFloats() * 4 + growing;
  }

  get tokensHeld(): number {
    return this.len.reduce((a, b) => a + b, 0);
  }

  /** Layer-tensor t: the keys of layer t, then the values of layer t - layers. */
  private tensorAt(t: number): Float32Array {
    const L = this.shape.layers;
    return t < L ? this.keys[t] : this.values[t - L];
  }

  /** `old`'s rows' tokens, copied into a fresh [rowsCap, kvHeads, capacity, D] buffer. */
  private regrown(old: Float32Array, capacity: number, rowsCap: number): Float32Array {
    const { kvHeads, headDim } = this.shape;
    const next = new Float32Array(rowsCap * kvHeads * capacity * headDim);
    for (let b = 0; b < this.rows; b++) {
      for (let h = 0; h < kvHeads; h++) {
        const src = (b * kvHeads + h) * this.capacity * headDim;
        const dst = (b * kvHeads + h) * capacity * headDim;
        next.set(old.subarray(src, src + this.len[b] * headDim), dst);
      }
    }
    return next;
  }

  /**
   * Called once per decode step: when the longest row nears the capacity,
   * copies the next few layer-tensors into the next bucket, and switches to
   * it once all are there.
   */
  growAhead(): void {
    if (!this.rows) return;
    const total = 2 * this.shape.layers;
    if (!this.growth) {
      if (this.capacity >= this.maxTokens || this.capacity - Math.max(...this.len) > GROWTH_LEAD) return;
      this.growth = { capacity: capacityBucket(this.capacity + 1, this.maxTokens), rowsCap: this.rowsCap, buffers: new Array(total).fill(null), done: 0 };
    }
    const g = this.growth;
    for (let n = Math.ceil(total / GROWTH_STEPS); n > 0 && g.done < total; n--, g.done++) {
      g.buffers[g.done] = this.regrown(this.tensorAt(g.done), g.capacity, g.rowsCap);
    }
    if (g.done < total) return;
    this.keys = g.buffers.slice(0, this.shape.layers) as Float32Array[];
    this.values = g.buffers.slice(this.shape.layers) as Float32Array[];
    this.capacity = g.capacity;
    this.growth = null;
  }

  /** Makes room for `rows` rows of `tokens` slots each, keeping every row's data. */
  ensure(rows: number, tokens: number): void {
    const capacity = Math.max(this.capacity, capacityBucket(tokens, this.maxTokens));
    // Rows join one at a time: grow geometrically, or filling a batch copies the cache O(rows²) times.
    const rowsCap = rows > this.rowsCap ? Math.max(rows, Math.min(this.maxRows, this.rowsCap * 2)) : this.rowsCap;
    if (capacity === this.capacity && rowsCap === this.rowsCap) return;
    // A sudden need (a long prompt joining) outruns the spread copy: grow at once instead.
    this.growth = null;
    const { kvHeads, headDim } = this.shape;
    const regrow = (old: Float32Array) => this.regrown(old, capacity, rowsCap);
    if (this.keys.length === 0) {
      for (let l = 0; l < this.shape.layers; l++) {
        this.keys.push(new Float32Array(rowsCap * kvHeads * capacity * headDim));
        this.values.push(new Float32Array(rowsCap * kvHeads * capacity * headDim));
      }
    } else {
      this.keys = this.keys.map(regrow);
      this.values = this.values.map(regrow);
    }
    this.capacity = capacity;
    this.rowsCap = rowsCap;
  }

  /**
   * Adds a row whose slots are copied from `src` (a [n, kvHeads, srcCap, D]
   * block, row `srcRow`): each segment's `tokens` slots from its `start`, one
   * after another (a KV prefix, then the prompt after the padding between them).
   */
  addRow(src: { keys: Float32Array[]; values: Float32Array[]; capacity: number; row: number; segments: readonly KvSegment[] }): number {
    const row = this.rows;
    const tokens = src.segments.reduce((n, s) => n + s.tokens, 0);
    this.ensure(row + 1, tokens + 1);
    const { kvHeads, headDim, layers } = this.shape;
    const g = this.growth;
    for (let t = 0; t < 2 * layers; t++) {
      const from = t < layers ? src.keys[t] : src.values[t - layers];
      const targets: [Float32Array, number][] = [[this.tensorAt(t), this.capacity]];
      if (g && t < g.done) targets.push([g.buffers[t]!, g.capacity]);
      for (const [to, capacity] of targets) {
        for (let h = 0; h < kvHeads; h++) {
          let d = (row * kvHeads + h) * capacity * headDim;
          for (const seg of src.segments) {
            const s = ((src.row * kvHeads + h) * src.capacity + seg.start) * headDim;
            to.set(from.subarray(s, s + seg.tokens * headDim), d);
            d += seg.tokens * headDim;
          }
        }
      }
    }
    this.len.push(tokens);
    return row;
  }

  /** Writes a [layers, kvHeads, n, D] prefix's keys and values into row `row`'s slots from `at` (lengths unchanged). */
  writePrefix(row: number, at: number, prefix: { tokens: number; keys: Float32Array; values: Float32Array }): void {
    const { kvHeads, headDim, layers } = this.shape;
    const n = prefix.tokens * headDim;
    for (let l = 0; l < layers; l++) {
      for (const [src, dst] of [[prefix.keys, this.keys[l]], [prefix.values, this.values[l]]]) {
        for (let h = 0; h < kvHeads; h++) {
          const s = (l * kvHeads + h) * n;
          dst.set(src.subarray(s, s + n), ((row * kvHeads + h) * this.capacity + at) * headDim);
        }
      }
    }
  }

  /** Counts `n` more slots as held by every row (slots written in place, as by writePrefix). */
  advance(n: number): void {
    for (let b = 0; b < this.rows; b++) this.len[b] += n;
  }

  removeRow(row: number): void {
    const last = this.rows - 1;
    if (row !== last) {
      const n = this.rowFloats();
      for (const buf of [...this.keys, ...this.values]) buf.copyWithin(row * n, last * n, (last + 1) * n);
      const g = this.growth;
      if (g) {
        const m = this.rowFloats(g.capacity);
        for (const buf of g.buffers.slice(0, g.done)) buf!.copyWithin(row * m, last * m, (last + 1) * m);
      }
      this.len[row] = this.len[last];
    }
    this.len.pop();
    if (this.rows === 0) this.reset();
  }

  /** Frees the buffers when the batch empties, so one long request does not hold memory forever. */
  private reset(): void {
    this.growth = null;
    this.keys = [];
    this.values = [];
    this.capacity = 0;
    this.rowsCap = 0;
  }

  /** Past views for a step over all rows: [rows, kvHeads, capacity, D]. */
  pastView(layer: number, kv: 'key' | 'value'): Float32Array {
    const buf = kv === 'key' ? this.keys[layer] : this.values[layer];
    return buf.subarray(0, this.rows * this.rowFloats());
  }

  /**
   * The first `tokens` slots of every row, packed: [rows, kvHeads, tokens, D]. A copy, for a
   * prefill chunk that would otherwise make capacity + chunk pass the model's context.
   */
  pastPacked(layer: number, kv: 'key' | 'value', tokens: number): Float32Array {
    const { kvHeads, headDim } = this.shape;
    const buf = kv === 'key' ? this.keys[layer] : this.values[layer];
    const out = new Float32Array(this.rows * kvHeads * tokens * headDim);
    for (let r = 0; r < this.rows * kvHeads; r++) {
      const s = r * this.capacity * headDim;
      out.set(buf.subarray(s, s + tokens * headDim), r * tokens * headDim);
    }
    return out;
  }

  /**
   * Writes a step's new K/V ([rows, kvHeads, S, D] per layer) at each row's next S slots.
   * A row already at the capped capacity is at the model's context: this step is its
   * last (the engine finishes it by length), so its token has no slot and is not kept.
   */
  append(newKeys: Float32Array[], newValues: Float32Array[], steps = 1): void {
    const { kvHeads, headDim, layers } = this.shape;
    const n = steps * headDim;
    const g = this.growth;
    for (let t = 0; t < 2 * layers; t++) {
      const src = t < layers ? newKeys[t] : newValues[t - layers];
      // Tensors already copied into the next bucket take the new slot there too.
      const targets: [Float32Array, number][] = [[this.tensorAt(t), this.capacity]];
      if (g && t < g.done) targets.push([g.buffers[t]!, g.capacity]);
      for (const [dst, capacity] of targets) {
        for (let b = 0; b < this.rows; b++) {
          if (this.len[b] + steps > capacity) continue;
          for (let h = 0; h < kvHeads; h++) {
            const s = (b * kvHeads + h) * n;
            const d = ((b * kvHeads + h) * capacity + this.len[b]) * headDim;
            dst.set(src.subarray(s, s + n), d);
          }
        }
      }
    }
    for (let b = 0; b < this.rows; b++) this.len[b] = Math.min(this.len[b] + steps, this.capacity);
  }

  /** Adds an empty row (a prefill group fills it chunk by chunk). */
  addEmptyRow(): number {
    this.len.push(0);
    return this.rows - 1;
  }
}
