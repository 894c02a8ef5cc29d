/**
 * A small seeded PRNG for sampling: xoshiro128** seeded through splitmix64.
 * Each row of a batch owns one, so a seeded request draws the same numbers
 * whatever else runs beside it.
 */
import { randomBytes } from 'node:crypto';

export interface Rng {
  /** The seed this generator started from (a crypto-random one when none was asked for). */
  readonly seed: bigint;
  /** A float in [0, 1) with 53 random bits. */
  next(): number;
}

const MASK64 = (1n << 64n) - 1n;

/** splitmix64 spreads any seed, even 0 or 1, over the whole state; xoshiro's authors recommend it. */
function splitmix64(state: { s: bigint }): bigint {
  state.s = (state.s + 0x9e3779b97f4a7c15n) & MASK64;
  let z = state.s;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return z ^ (z >> 31n);
}

/** Any JSON number maps to a distinct 64-bit seed: integers by value, others by their IEEE bits. */
function seedBits(seed: number | bigint): bigint {
  if (typeof seed === 'bigint') return BigInt.asUintN(64, seed);
  if (Number.isSafeInteger(seed)) return BigInt.asUintN(64, BigInt(seed));
  const view = new DataView(new ArrayBuffer(8));
  view.setFloat64(0, seed);
  return view.getBigUint64(0);
}

class Xoshiro128 implements Rng {
  private readonly s = new Uint32Array(4);

  constructor(readonly seed: bigint) {
    const mix = { s: seed };
    const a = splitmix64(mix);
    const b = splitmix64(mix);
    this.s[0] = Number(a & 0xffffffffn);
    this.s[1] = Number(a >> 32n);
    this.s[2] = Number(b & 0xffffffffn);
    this.s[3] = Number(b >> 32n);
    // The all-zero state is xoshiro's one fixed point.
    if ((this.s[0] | this.s[1] | this.s[2] | this.s[3]) === 0) this.s[0] = 1;
  }

  private nextU32(): number {
    const s = this.s;
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  next(): number {
    const hi = this.nextU32() >>> 5; // 27 bits
    const lo = this.nextU32() >>> 6; // 26 bits
    return (hi * 67108864 + lo) / 9007199254740992;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

/** A generator for `seed`, or for a fresh crypto-random seed when it is null. */
export function createRng(seed: number | bigint | null): Rng {
  const bits = seed === null ? randomBytes(8).readBigUInt64BE() : seedBits(seed);
  return new Xoshiro128(bits);
}
