/**
 * The small graphs that move per-row memory on the device, so the KV cache
 * never leaves it: each takes the same op to every one of `n` tensors (all
 * layers' keys and values) in one run. Only O(rows) numbers come from the
 * host: lengths, a row order, a few offsets. Comparisons are made in float32
 * (exact for positions below 2^24) because the WebGPU provider compares and
 * casts int64 on the CPU, which would carry a [rows, capacity] mask across.
 */
import { DataType, GraphBuilder } from '../../backbone/onnx/graph-builder.js';

const T = (i: number) => `t.${i}`;
const NEW = (i: number) => `new.${i}`;
const OUT = (i: number) => `out.${i}`;
const kvDims = ['rows', 'heads', 'slots', 'dim'];

function build(name: string, n: number, body: (g: GraphBuilder, i: number) => string, extra: (g: GraphBuilder) => void, withNew = false): Uint8Array {
  const g = new GraphBuilder();
  for (let i = 0; i < n; i++) g.input(T(i), DataType.FLOAT, kvDims);
  if (withNew) for (let i = 0; i < n; i++) g.input(NEW(i), DataType.FLOAT, ['rows', 'heads', 'steps', 'dim']);
  extra(g);
  for (let i = 0; i < n; i++) {
    g.opNamed('Identity', [body(g, i)], OUT(i));
    g.output(OUT(i), DataType.FLOAT, kvDims);
  }
  return g.encode(name);
}

export const rowGraphNames = { input: T, fresh: NEW, output: OUT };

/** out = Pad(t, pads) with zeros: `pads` int64 [8] (begins, then ends, of the 4 axes). */
export const padGraph = (n: number) =>
  build('pad', n, (g, i) => g.op('Pad', [T(i), 'pads']), (g) => g.input('pads', DataType.INT64, [8]));

/** out = t[order]: rows reordered, dropped or repeated (`order` int64 [rows']). */
export const gatherGraph = (n: number) =>
  build('gather', n, (g, i) => g.op('Gather', [T(i), 'order'], { axis: 0 }), (g) => g.input('order', DataType.INT64, ['rows_out']));

/**
 * Rows joining, all in one run (a prefill group's rows move into the decode
 * batch together, so the batch's cache is written once, not once a row): new
 * row j takes the source slots listed in `index` (int64 [k, capacity]: row r's
 * slot s of `src.i` is r · srcCapacity + s, its segments' slots one after
 * another), and slot s is kept where its position (`slots`, as in
 * append-one) is below `lengths[j]`, zero after. The new rows are appended
 * after t's rows (or alone, with no t).
 */
export function joinGraph(n: number, first: boolean): Uint8Array {
  const g = new GraphBuilder();
  if (!first) for (let i = 0; i < n; i++) g.input(T(i), DataType.FLOAT, kvDims);
  for (let i = 0; i < n; i++) g.input(`src.${i}`, DataType.FLOAT, kvDims);
  g.input('index', DataType.INT64, ['k', 'capacity']);
  g.input('lengths', DataType.FLOAT, ['k']);
  g.input('slots', DataType.FLOAT, ['slots_plus_one']);
  const cap = g.op('Shape', ['index'], { start: 1, end: 2 });
  const slot = g.op('Reshape', [g.op('Slice', ['slots', g.ints([0]), cap, g.ints([0])]), g.ints([1, 1, -1, 1])]);
  const keep = g.op('Less', [slot, g.op('Reshape', ['lengths', g.ints([-1, 1, 1, 1])])]);
  // [k, capacity, heads, D] from rows of [srcRows · srcCapacity, heads · D]: one Gather takes every new row's slots.
  const shape = g.op('Concat', [g.ints([0, 0]), g.op('Shape', ['src.0'], { start: 1, end: 2 }), g.ints([-1])], { axis: 0 });
  for (let i = 0; i < n; i++) {
    const flat = g.op('Flatten', [g.op('Transpose', [`src.${i}`], { perm: [0, 2, 1, 3] })], { axis: 2 });
    const picked = g.op('Reshape', [g.op('Gather', [flat, 'index'], { axis: 0 }), shape]);
    const rows = g.op('Where', [keep, g.op('Transpose', [picked], { perm: [0, 2, 1, 3] }), g.scalar(0)]);
    g.opNamed(first ? 'Identity' : 'Concat', first ? [rows] : [T(i), rows], OUT(i), first ? {} : { axis: 0 });
    g.output(OUT(i), DataType.FLOAT, kvDims);
  }
  return g.encode(first ? 'join-first' : 'join');
}

/** out = t[:, :, :tokens]: every row's first `tokens` slots (`tokens` int64 [1]), a packed past. */
export const packGraph = (n: number) =>
  build('pack', n, (g, i) => g.op('Slice', [T(i), g.ints([0]), 'tokens', g.ints([2])]), (g) => g.input('tokens', DataType.INT64, [1]));

/**
 * A decode step's new K/V ([rows, heads, 1, D]) written at each row's slot
 * `lengths[b]`: out = Where(slot == lengths[b], new, t). `slots` is the
 * device's [capacity + 1] float positions (0..capacity-1, then -1).
 */
export const appendOneGraph = (n: number) => {
  let hit = '';
  return build('append-one', n, (g, i) => g.op('Where', [hit, NEW(i), T(i)]), (g) => {
    g.input('lengths', DataType.FLOAT, ['rows']);
    g.input('slots', DataType.FLOAT, ['slots_plus_one']);
    const cap = g.op('Shape', [T(0)], { start: 2, end: 3 });
    const slot = g.op('Reshape', [g.op('Slice', [ 'slots', g.ints([0]), cap, g.ints([0])]), g.ints([1, 1, -1, 1])]);
    hit = g.op('Equal', [slot, g.op('Reshape', ['lengths', g.ints([-1, 1, 1, 1])])]);
  }, true);
};

/**
 * A run of `steps` new slots written at the same slot `first` of every row (a
 * prefill group's rows all hold the same count): the new K/V are padded into
 * place (`pads`) and chosen where |slot − centre| < half, centre = first +
 * (steps − 1)/2, half = steps/2, which holds exactly on first..first+steps-1.
 */
export const appendRunGraph = (n: number) => {
  let hit = '';
  return build('append-run', n, (g, i) => g.op('Where', [hit, g.op('Pad', [NEW(i), 'pads']), T(i)]), (g) => {
    g.input('pads', DataType.INT64, [8]);
    g.input('centre', DataType.FLOAT, [1]);
    g.input('half', DataType.FLOAT, [1]);
    g.input('slots', DataType.FLOAT, ['slots_plus_one']);
    const cap = g.op('Shape', [T(0)], { start: 2, end: 3 });
    const slot = g.op('Reshape', [g.op('Slice', ['slots', g.ints([0]), cap, g.ints([0])]), g.ints([1, 1, -1, 1])]);
    hit = g.op('Less', [g.op('Abs', [g.op('Sub', [slot, 'centre'])]), 'half']);
  }, true);
};

/**
 * A decode step's attention mask, int64 [rows, capacity + 1]: slot j < lengths[b],
 * and the new token's column (whose position in `slots` is −1, below any length).
 */
export function maskGraph(): Uint8Array {
  const g = new GraphBuilder();
  g.input('lengths', DataType.FLOAT, ['rows']);
  g.input('slots', DataType.FLOAT, ['slots_plus_one']);
  const seen = g.op('Less', [g.op('Reshape', ['slots', g.ints([1, -1])]), g.op('Reshape', ['lengths', g.ints([-1, 1])])]);
  g.opNamed('Cast', [seen], 'mask', { to: DataType.INT64 });
  g.output('mask', DataType.INT64, ['rows', 'slots_plus_one']);
  return g.encode('decode-mask');
}

/** The host's copy of chosen rows of a device tensor (`order` int64 [k]). */
export function pickRowsGraph(): Uint8Array {
  const g = new GraphBuilder();
  g.input('t', DataType.FLOAT, ['rows', 'width']);
  g.input('order', DataType.INT64, ['k']);
  g.opNamed('Gather', ['t', 'order'], 'picked', { axis: 0 });
  g.output('picked', DataType.FLOAT, ['k', 'width']);
  return g.encode('pick-rows');
}

/** One tensor across, either way: `Identity`, its output on the device or the host as the session says. */
export function uploadGraph(elemType: number): Uint8Array {
  const g = new GraphBuilder();
  // No shape: any rank passes.
  g.inputs.push({ name: 'host', type: { tensorType: { elemType } } });
  g.opNamed('Identity', ['host'], 'device');
  g.outputs.push({ name: 'device', type: { tensorType: { elemType } } });
  return g.encode('upload');
}

/** Zeros of the given shape (int64 [4]): a one-slot, masked-out past for a first prefill chunk (WebGPU takes no zero-size past). */
export function zerosGraph(): Uint8Array {
  const g = new GraphBuilder();
  g.input('shape', DataType.INT64, [4]);
  g.opNamed('Expand', [g.scalar(0), 'shape'], 'zeros');
  g.output('zeros', DataType.FLOAT, kvDims);
  return g.encode('zeros');
}
