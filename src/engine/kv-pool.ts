/**
 * The KV cache of the running batch, in buffers the engine owns: per layer a
 * [rows, kvHeads, capacity, headDim] block for keys and one for values. Row b
 * holds its tokens in slots 0..len[b]-1; the attention mask hides the rest.
 * The buffers are fed to ORT as `past` in place (a view, no copy), the graph
 * returns only the step's new K/V, and the engine writes that one slot per row.
 *
 * Capacity grows in buckets so shapes (and ORT's kernels) rarely change;
 * removing a row moves the last row into its place, like the banks.
 */
export function capacityBucket(tokens: number): number {
  let c = 64;
  while (c < tokens) c *= 2;
  return c;
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

  /** `maxRows` caps the geometric growth of the row capacity (the engine's max batch). */
  constructor(readonly shape: KvShape, private readonly maxRows = Infinity) {}

  get rows(): number {
    return this.len.length;
  }

  /** Floats per row per layer-tensor. */
  private rowFloats(capacity = this.capacity): number {
    return this.shape.kvHeads * capacity * this.shape.headDim;
  }

  get bytesAllocated(): number {
    return 2 * this.shape.layers * this.rowsCap * this.rowFloats() * 4;
  }

  get tokensHeld(): number {
    return this.len.reduce((a, b) => a + b, 0);
  }

  /** Makes room for `rows` rows of `tokens` slots each, keeping every row's data. */
  ensure(rows: number, tokens: number): void {
    const capacity = Math.max(this.capacity, capacityBucket(tokens));
    // Rows join one at a time: grow geometrically, or filling a batch copies the cache O(rows²) times.
    const rowsCap = rows > this.rowsCap ? Math.max(rows, Math.min(this.maxRows, this.rowsCap * 2)) : this.rowsCap;
    if (capacity === this.capacity && rowsCap === this.rowsCap) return;
    const { kvHeads, headDim } = this.shape;
    const regrow = (old: Float32Array) => {
      const next = new Float32Array(rowsCap * kvHeads * capacity * headDim);
      for (let b = 0; b < this.rows; b++) {
        for (let h = 0; h < kvHeads; h++) {
          const src = (b * kvHeads + h) * this.capacity * headDim;
          const dst = (b * kvHeads + h) * capacity * headDim;
          next.set(old.subarray(src, src + this.len[b] * headDim), dst);
        }
      }
      return next;
    };
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

  /** Adds a row whose first `tokens` slots are copied from `src` (a [n, kvHeads, srcCap, D] block, row `srcRow`, slots from `srcStart`). */
  addRow(
    tokens: number,
    src: { keys: Float32Array[]; values: Float32Array[]; capacity: number; row: number; start: number },
  ): number {
    const row = this.rows;
    this.ensure(row + 1, tokens + 1);
    const { kvHeads, headDim } = this.shape;
    for (let l = 0; l < this.shape.layers; l++) {
      for (const [from, to] of [[src.keys[l], this.keys[l]], [src.values[l], this.values[l]]] as const) {
        for (let h = 0; h < kvHeads; h++) {
          const s = ((src.row * kvHeads + h) * src.capacity + src.start) * headDim;
          const d = (row * kvHeads + h) * this.capacity * headDim;
          to.set(from.subarray(s, s + tokens * headDim), d);
        }
      }
    }
    this.len.push(tokens);
    return row;
  }

  removeRow(row: number): void {
    const last = this.rows - 1;
    if (row !== last) {
      const n = this.rowFloats();
      for (const buf of [...this.keys, ...this.values]) buf.copyWithin(row * n, last * n, (last + 1) * n);
      this.len[row] = this.len[last];
    }
    this.len.pop();
    if (this.rows === 0) this.reset();
  }

  /** Frees the buffers when the batch empties, so one long request does not hold memory forever. */
  private reset(): void {
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

  /** Writes a step's new K/V ([rows, kvHeads, S, D] per layer) at each row's next S slots. */
  append(newKeys: Float32Array[], newValues: Float32Array[], steps = 1): void {
    const { kvHeads, headDim } = this.shape;
    const n = steps * headDim;
    for (let l = 0; l < this.shape.layers; l++) {
      for (const [src, dst] of [[newKeys[l], this.keys[l]], [newValues[l], this.values[l]]] as const) {
        for (let b = 0; b < this.rows; b++) {
          for (let h = 0; h < kvHeads; h++) {
            const s = (b * kvHeads + h) * n;
            const d = ((b * kvHeads + h) * this.capacity + this.len[b]) * headDim;
            dst.set(src.subarray(s, s + n), d);
          }
        }
      }
    }
    for (let b = 0; b < this.rows; b++) this.len[b] += steps;
  }

  /** Adds an empty row (a prefill group fills it chunk by chunk). */
  addEmptyRow(): number {
    this.len.push(0);
    return this.rows - 1;
  }
}
