/**
 * Deterministic weights: each tensor's values depend only on the backbone's
 * seed and the tensor's name, so changing one tensor (a merged-delta model in
 * a test) leaves every other tensor bit-identical.
 */
import { createHash } from 'node:crypto';

function seedFor(seed: number, name: string): [number, number, number, number] {
  const h = createHash('sha256').update(`${seed}:${name}`).digest();
  return [h.readUInt32LE(0), h.readUInt32LE(4), h.readUInt32LE(8), h.readUInt32LE(12) | 1];
}

/** xoshiro128** — fast, and good enough for weights. */
function generator(state: [number, number, number, number]) {
  let [a, b, c, d] = state;
  return () => {
    const t = b << 9;
    let r = Math.imul(b, 5);
    r = Math.imul((r << 7) | (r >>> 25), 9);
    c ^= a;
    d ^= b;
    b ^= c;
    a ^= d;
    c ^= t;
    d = (d << 11) | (d >>> 21);
    return (r >>> 0) / 4294967296;
  };
}

export function normal(seed: number, name: string, n: number, std: number, mean = 0): Float32Array {
  const next = generator(seedFor(seed, name));
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    // Box–Muller gives two independent normals per pair of uniforms.
    const u = Math.max(next(), 1e-12);
    const v = next();
    const r = Math.sqrt(-2 * Math.log(u)) * std;
    out[i] = mean + r * Math.cos(2 * Math.PI * v);
    if (i + 1 < n) out[i + 1] = mean + r * Math.sin(2 * Math.PI * v);
  }
  return out;
}

export function constant(n: number, value: number): Float32Array {
  return new Float32Array(n).fill(value);
}
