/**
 * safetensors: an 8-byte little-endian header length, a JSON header naming each
 * tensor's dtype, shape and [begin, end) byte range in the data region, then the
 * data. Uploaded files are untrusted, so every field is checked before a byte
 * of tensor data is touched.
 */
import { endianness } from 'node:os';
import { Problems } from './problems.js';

export type Dtype = 'F32' | 'F16' | 'BF16';
const DTYPE_BYTES: Record<Dtype, number> = { F32: 4, F16: 2, BF16: 2 };
/** The format's own cap; a larger header is a hostile or broken file. */
const MAX_HEADER_BYTES = 100 * 1024 * 1024;
const LITTLE_ENDIAN = endianness() === 'LE';

export interface TensorInfo {
  name: string;
  dtype: Dtype;
  shape: number[];
  /** Byte range inside the data region. */
  begin: number;
  end: number;
}

export interface SafeTensors {
  metadata: Record<string, string> | null;
  tensors: Map<string, TensorInfo>;
  /** The tensor's values as float32; a view into the file when it is aligned F32. */
  read(name: string): Float32Array;
}

function isDtype(x: unknown): x is Dtype {
  return x === 'F32' || x === 'F16' || x === 'BF16';
}

function isIndex(x: unknown): x is number {
  return typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
}

/**
 * Parses and bounds-checks a whole safetensors file held in memory. Throws a
 * 422 listing every problem, together with any a caller already collected.
 */
export function parseSafetensors(
  buf: Uint8Array,
  file: string,
  problems: Problems = new Problems(),
  subject = `safetensors file '${file}'`,
): SafeTensors {
  const before = problems.count;
  if (buf.byteLength < 8) problems.fail(subject, `${file} is ${buf.byteLength} bytes, too short for the 8-byte header length`);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const headerLen = Number(view.getBigUint64(0, true));
  if (headerLen > MAX_HEADER_BYTES || 8 + headerLen > buf.byteLength) {
    problems.fail(subject, `${file} declares a ${headerLen}-byte header but the file is ${buf.byteLength} bytes`);
  }
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(buf.subarray(8, 8 + headerLen)));
  } catch (err) {
    problems.fail(subject, `${file} header is not valid UTF-8 JSON: ${(err as Error).message}`);
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header)) {
    problems.fail(subject, `${file} header is not a JSON object`);
  }

  const dataStart = 8 + headerLen;
  const dataLen = buf.byteLength - dataStart;
  const tensors = new Map<string, TensorInfo>();
  let metadata: Record<string, string> | null = null;
  for (const [name, entry] of Object.entries(header as Record<string, unknown>)) {
    if (name === '__metadata__') {
      metadata = entry as Record<string, string>;
      continue;
    }
    const e = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown } | null;
    if (typeof e !== 'object' || e === null) {
      problems.invalid(`${file}: tensor '${name}' has no dtype/shape/data_offsets entry`);
      continue;
    }
    const shape = e.shape;
    const offsets = e.data_offsets;
    if (!Array.isArray(shape) || !shape.every(isIndex)) {
      problems.invalid(`${file}: tensor '${name}' has an invalid shape ${JSON.stringify(shape)}`);
      continue;
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isIndex) || offsets[0] > offsets[1]) {
      problems.invalid(`${file}: tensor '${name}' has invalid data_offsets ${JSON.stringify(offsets)}`);
      continue;
    }
    if (!isDtype(e.dtype)) {
      problems.unsupported(
        `${file}: tensor '${name}' has dtype ${JSON.stringify(e.dtype)}; deltaserve reads F32, F16 and BF16`,
      );
      continue;
    }
    const [begin, end] = offsets as [number, number];
    if (end > dataLen) {
      problems.invalid(`${file}: tensor '${name}' ends at byte ${end} of a ${dataLen}-byte data region`);
      continue;
    }
    const expected = shape.reduce((n: number, d: number) => n * d, 1) * DTYPE_BYTES[e.dtype];
    if (end - begin !== expected) {
      problems.invalid(
        `${file}: tensor '${name}' is ${e.dtype} ${JSON.stringify(shape)} = ${expected} bytes but its data_offsets span ${end - begin}`,
      );
      continue;
    }
    tensors.set(name, { name, dtype: e.dtype, shape, begin, end });
  }

  const sorted = [...tensors.values()].filter((t) => t.end > t.begin).sort((a, b) => a.begin - b.begin);
  for (let i = 1; i < sorted.length; i++) {
    if (sorted[i].begin < sorted[i - 1].end) {
      problems.invalid(`${file}: tensors '${sorted[i - 1].name}' and '${sorted[i].name}' overlap in the data region`);
    }
  }
  // Only this file's problems stop here; the caller's own go on to be collected with the rest.
  if (problems.count > before) throw problems.toError(subject);

  return {
    metadata,
    tensors,
    read(name: string): Float32Array {
      const t = tensors.get(name);
      if (!t) throw new Error(`no tensor '${name}' in ${file}`);
      return decode(buf, dataStart + t.begin, (t.end - t.begin) / DTYPE_BYTES[t.dtype], t.dtype);
    },
  };
}

function decode(buf: Uint8Array, offset: number, count: number, dtype: Dtype): Float32Array {
  const at = buf.byteOffset + offset;
  if (dtype === 'F32' && LITTLE_ENDIAN && at % 4 === 0) return new Float32Array(buf.buffer, at, count);
  const view = new DataView(buf.buffer, at, count * DTYPE_BYTES[dtype]);
  const out = new Float32Array(count);
  if (dtype === 'F32') {
    for (let i = 0; i < count; i++) out[i] = view.getFloat32(i * 4, true);
  } else if (dtype === 'BF16') {
    // bf16 is the top half of an f32.
    const bits = new Uint32Array(out.buffer);
    for (let i = 0; i < count; i++) bits[i] = view.getUint16(i * 2, true) << 16;
  } else {
    for (let i = 0; i < count; i++) out[i] = halfToFloat(view.getUint16(i * 2, true));
  }
  return out;
}

function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** Round to nearest even, as torch's `.to(torch.bfloat16)` does. */
function floatToBf16(x: number): number {
  f32[0] = x;
  const bits = u32[0];
  if ((bits & 0x7f800000) === 0x7f800000 && bits & 0x7fffff) return 0x7fc0;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

/** Round to nearest even, with subnormals, overflow to infinity. */
function floatToHalf(x: number): number {
  f32[0] = x;
  const bits = u32[0];
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  let mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    const rest = mant & ((1 << shift) - 1);
    let out = mant >>> shift;
    if (rest > half || (rest === half && out & 1)) out++;
    return sign | out;
  }
  let out = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && out & 1)) out++;
  return sign | out;
}

export interface TensorToWrite {
  dtype: Dtype;
  shape: number[];
  data: Float32Array;
}

/** Encodes tensors as a safetensors file (header padded so the data region starts 8-byte aligned). */
export function encodeSafetensors(
  tensors: Record<string, TensorToWrite>,
  metadata?: Record<string, string>,
): Uint8Array {
  const header: Record<string, unknown> = metadata ? { __metadata__: metadata } : {};
  let offset = 0;
  const entries = Object.entries(tensors);
  for (const [name, t] of entries) {
    const count = t.shape.reduce((n, d) => n * d, 1);
    if (count !== t.data.length) throw new Error(`tensor '${name}': shape ${JSON.stringify(t.shape)} needs ${count} values, got ${t.data.length}`);
    const bytes = count * DTYPE_BYTES[t.dtype];
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const headerBytes = Buffer.from(json, 'utf8');
  const out = new Uint8Array(8 + headerBytes.length + offset);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(headerBytes.length), true);
  out.set(headerBytes, 8);
  let at = 8 + headerBytes.length;
  for (const [, t] of entries) {
    for (const x of t.data) {
      if (t.dtype === 'F32') view.setFloat32(at, x, true);
      else view.setUint16(at, t.dtype === 'BF16' ? floatToBf16(x) : floatToHalf(x), true);
      at += DTYPE_BYTES[t.dtype];
    }
  }
  return out;
}
