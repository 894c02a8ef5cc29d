/**
 * Thin helpers over onnx-proto (protobufjs with ONNX's schema): reading and
 * writing models, and moving tensor data between TensorProto and typed arrays.
 */
import { closeSync, fstatSync, openSync, readFileSync, readSync } from 'node:fs';
import { isAbsolute, join, relative, resolve } from 'node:path';
import onnxProto from 'onnx-proto';
import { halfBytesToFloats, halfToFloat } from './half-float.js';

export const onnx = onnxProto.onnx;
export type ModelProto = onnxProto.onnx.ModelProto;
export type GraphProto = onnxProto.onnx.IGraphProto;
export type NodeProto = onnxProto.onnx.INodeProto;
export type TensorProto = onnxProto.onnx.ITensorProto;
export type ValueInfoProto = onnxProto.onnx.IValueInfoProto;
export type AttributeProto = onnxProto.onnx.IAttributeProto;

export const DataType = onnx.TensorProto.DataType;

export type AttrValue = number | string | number[] | Float32Array | { floats: number[] } | TensorProto;

export function decodeModel(bytes: Uint8Array): ModelProto {
  return onnx.ModelProto.decode(bytes);
}

export function encodeModel(model: onnxProto.onnx.IModelProto): Uint8Array {
  return onnx.ModelProto.encode(model).finish();
}

/** Reads a model's graph; tensors stored as external data stay there (see tensorBytes). */
export function readModel(path: string, read: (path: string) => Uint8Array = readFileSync): ModelProto {
  return decodeModel(read(path));
}

const isExternal = (t: TensorProto) => t.dataLocation === onnx.TensorProto.DataLocation.EXTERNAL;

function externalRef(t: TensorProto, baseDir: string) {
  const kv = Object.fromEntries((t.externalData ?? []).map((e) => [e.key, e.value]));
  const location = kv.location ?? '';
  const rel = relative(baseDir, resolve(baseDir, location));
  // A crafted model must not make the server read files outside its own folder.
  if (!location || rel.startsWith('..') || isAbsolute(rel)) {
    throw new Error(`tensor ${t.name} points at external data outside the model folder: '${location}'`);
  }
  return { location: rel, offset: Number(kv.offset ?? 0), length: kv.length !== undefined ? Number(kv.length) : null };
}

/** The external data files a model reads, relative to its folder (empty for a self-contained model). */
export function externalDataFiles(model: ModelProto, baseDir: string): string[] {
  return [...new Set((model.graph?.initializer ?? []).filter(isExternal).map((t) => externalRef(t, baseDir).location))];
}

/** Bytes of a tensor's data: inline, or read from its external data file. */
export function tensorBytes(t: TensorProto, baseDir: string): Uint8Array {
  if (!isExternal(t)) return t.rawData ?? new Uint8Array(0);
  const ref = externalRef(t, baseDir);
  const fd = openSync(join(baseDir, ref.location), 'r');
  try {
    const length = ref.length ?? fstatSync(fd).size - ref.offset;
    const out = new Uint8Array(length);
    if (readSync(fd, out, 0, length, ref.offset) !== length) throw new Error(`tensor ${t.name}: external data past the end of ${ref.location}`);
    return out;
  } finally {
    closeSync(fd);
  }
}

/** Bytes a tensor's data takes, without reading it. */
export function tensorByteLength(t: TensorProto): number {
  if (!isExternal(t)) return t.rawData?.length ?? 0;
  const length = (t.externalData ?? []).find((e) => e.key === 'length')?.value;
  return length !== undefined && length !== null ? Number(length) : dimsOf(t).reduce((a, b) => a * b, 1) * 4;
}

export function dimsOf(t: TensorProto): number[] {
  return (t.dims ?? []).map((d) => Number(d));
}

/** A float tensor's values as float32 (copies only when the data is not aligned raw float32). */
export function floatData(t: TensorProto, baseDir = '.'): Float32Array {
  const n = dimsOf(t).reduce((a, b) => a * b, 1);
  if (t.dataType === DataType.FLOAT) {
    const raw = isExternal(t) ? tensorBytes(t, baseDir) : t.rawData;
    if (raw && raw.length) {
      if (raw.byteOffset % 4 === 0) return new Float32Array(raw.buffer, raw.byteOffset, n);
      // Buffer#slice is a view, not a copy: copy through Uint8Array's own slice.
      return new Float32Array(Uint8Array.prototype.slice.call(raw).buffer, 0, n);
    }
    return Float32Array.from(t.floatData ?? []);
  }
  if (t.dataType === DataType.FLOAT16) {
    // A float16 export's values: raw bytes, or int32Data holding one half per entry.
    const raw = isExternal(t) ? tensorBytes(t, baseDir) : t.rawData;
    if (raw && raw.length) return halfBytesToFloats(raw);
    return Float32Array.from(t.int32Data ?? [], halfToFloat);
  }
  throw new Error(`tensor ${t.name} has data type ${t.dataType}; expected float32 or float16`);
}

export function floatTensor(name: string, data: Float32Array, dims: number[]): TensorProto {
  return {
    name,
    dataType: DataType.FLOAT,
    dims,
    rawData: new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
  };
}

export function int64Tensor(name: string, values: (number | bigint)[], dims: number[]): TensorProto {
  const arr = BigInt64Array.from(values.map((v) => BigInt(v)));
  return { name, dataType: DataType.INT64, dims, rawData: new Uint8Array(arr.buffer) };
}

export function attribute(name: string, value: AttrValue): AttributeProto {
  const T = onnx.AttributeProto.AttributeType;
  if (typeof value === 'number') {
    return Number.isInteger(value) && !Object.is(value, -0)
      ? { name, type: T.INT, i: value }
      : { name, type: T.FLOAT, f: value };
  }
  if (typeof value === 'string') return { name, type: T.STRING, s: new TextEncoder().encode(value) };
  if (Array.isArray(value)) return { name, type: T.INTS, ints: value };
  if (value instanceof Float32Array) return { name, type: T.FLOATS, floats: Array.from(value) };
  if ('floats' in value) return { name, type: T.FLOATS, floats: value.floats };
  return { name, type: T.TENSOR, t: value };
}

/** A float attribute that happens to hold an integral value (epsilon 1, alpha 2). */
export function floatAttr(name: string, value: number): AttributeProto {
  return { name, type: onnx.AttributeProto.AttributeType.FLOAT, f: value };
}

export function attrInts(node: NodeProto, name: string): number[] | undefined {
  const a = node.attribute?.find((x) => x.name === name);
  return a?.ints?.map((v) => Number(v));
}

export function attrInt(node: NodeProto, name: string): number | undefined {
  const a = node.attribute?.find((x) => x.name === name);
  return a && a.i !== undefined && a.i !== null ? Number(a.i) : undefined;
}

export function valueInfo(name: string, elemType: number, dims: (number | string)[]): ValueInfoProto {
  return {
    name,
    type: {
      tensorType: {
        elemType,
        shape: { dim: dims.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })) },
      },
    },
  };
}

/** Dimensions of a graph input/output: numbers where fixed, names where symbolic. */
export function shapeOf(v: ValueInfoProto): (number | string)[] {
  return (v.type?.tensorType?.shape?.dim ?? []).map((d) =>
    d.dimParam ? d.dimParam : d.dimValue !== undefined && d.dimValue !== null ? Number(d.dimValue) : '?',
  );
}
