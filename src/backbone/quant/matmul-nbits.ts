/**
 * onnxruntime's block-wise weight format (the `com.microsoft` contrib op
 * MatMulNBits, as its ContribOperators.md documents it), written by
 * round-to-nearest per block. No npm package writes it; this is the whole of
 * it.
 *
 * MatMulNBits computes `Y = A · dequant(B)ᵀ` for a weight W of N rows
 * (output features) and K columns (input features). Each row is cut along K
 * into blocks of `block_size`; each block has a float scale and an unsigned
 * zero point, and element k of row n dequantizes as
 * `(q[n, k] − zero_point[n, block]) · scale[n, block]`.
 *
 * - B: uint8 [N, n_blocks, blob_size], blob_size = block_size·bits/8; codes
 *   packed low bits first (4-bit: element 2i in the low nibble of byte i).
 * - scales: float32 [N·n_blocks].
 * - zero_points: uint8 [N·ceil(n_blocks·bits/8)], packed the same way per row.
 * - a K that is not a multiple of the block is padded with codes that
 *   dequantize to 0.
 */

export type Bits = 4 | 8;
export const BLOCK_SIZES = [32, 64, 128] as const;
export type BlockSize = (typeof BLOCK_SIZES)[number];

export interface BlockQuantized {
  bits: Bits;
  blockSize: number;
  /** Output features (rows of W). */
  N: number;
  /** Input features (columns of W). */
  K: number;
  /** [N, nBlocks, blobSize]. */
  packed: Uint8Array;
  /** [N·nBlocks]. */
  scales: Float32Array;
  /** [N·ceil(nBlocks·bits/8)]. */
  zeroPoints: Uint8Array;
}

export const blocksPerRow = (K: number, blockSize: number) => Math.ceil(K / blockSize);
export const blobSize = (blockSize: number, bits: Bits) => (blockSize * bits) / 8;
export const zeroPointBytesPerRow = (nBlocks: number, bits: Bits) => Math.ceil((nBlocks * bits) / 8);

function writeCode(bytes: Uint8Array, base: number, index: number, code: number, bits: Bits): void {
  if (bits === 8) bytes[base + index] = code;
  else bytes[base + (index >> 1)] |= (index & 1) ? code << 4 : code;
}

/**
 * Quantizes W, given row by row (`weight(n, k)`), asymmetrically per block:
 * the block's range, widened to include 0 so zero stays exact, is split into
 * 2^bits − 1 steps and each weight rounded to the nearest.
 */
export function quantizeBlockwise(weight: (n: number, k: number) => number, N: number, K: number, bits: Bits, blockSize: number): BlockQuantized {
  const nBlocks = blocksPerRow(K, blockSize);
  const blob = blobSize(blockSize, bits);
  const zpRow = zeroPointBytesPerRow(nBlocks, bits);
  const maxCode = (1 << bits) - 1;
  const packed = new Uint8Array(N * nBlocks * blob);
  const scales = new Float32Array(N * nBlocks);
  const zeroPoints = new Uint8Array(N * zpRow);
  const block = new Float32Array(blockSize);
  for (let n = 0; n < N; n++) {
    for (let b = 0; b < nBlocks; b++) {
      const k0 = b * blockSize;
      const len = Math.min(blockSize, K - k0);
      let lo = 0;
      let hi = 0;
      for (let i = 0; i < len; i++) {
        const w = weight(n, k0 + i);
        block[i] = w;
        if (w < lo) lo = w;
        if (w > hi) hi = w;
      }
      // A block of zeros: any scale works; 1 keeps the dequantized zeros exact.
      const scale = Math.fround(hi > lo ? (hi - lo) / maxCode : 1);
      const zp = Math.min(maxCode, Math.max(0, Math.round(-lo / scale)));
      scales[n * nBlocks + b] = scale;
      writeCode(zeroPoints, n * zpRow, b, zp, bits);
      const base = (n * nBlocks + b) * blob;
      for (let i = 0; i < blockSize; i++) {
        const code = i < len ? Math.min(maxCode, Math.max(0, Math.round(block[i] / scale) + zp)) : zp;
        writeCode(packed, base, i, code, bits);
      }
    }
  }
  return { bits, blockSize, N, K, packed, scales, zeroPoints };
}

/** Bytes the quantized weight takes (codes, scales, zero points) — what a step streams instead of 4·N·K. */
export const quantizedBytes = (q: BlockQuantized) => q.packed.byteLength + q.scales.byteLength + q.zeroPoints.byteLength;
