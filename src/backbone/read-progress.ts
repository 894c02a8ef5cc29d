/** Reads a file whole, with a progress bar on a terminal when it is big enough to wait for. */
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { basename } from 'node:path';
import cliProgress from 'cli-progress';

const SHOW_ABOVE_BYTES = 64 * 2 ** 20;
const CHUNK = 16 * 2 ** 20;

export function readFileWithProgress(path: string): Buffer {
  const fd = openSync(path, 'r');
  try {
    const size = fstatSync(fd).size;
    const out = Buffer.allocUnsafe(size);
    const bar = size > SHOW_ABOVE_BYTES && process.stderr.isTTY
      ? new cliProgress.SingleBar({ format: `loading ${basename(path)} [{bar}] {percentage}% | {value}/{total} MiB`, stream: process.stderr }, cliProgress.Presets.shades_classic)
      : null;
    bar?.start(Math.ceil(size / 2 ** 20), 0);
    for (let off = 0; off < size;) {
      const n = readSync(fd, out, off, Math.min(CHUNK, size - off), off);
      if (n === 0) throw new Error(`${path} ended early, at ${off} of ${size} bytes`);
      off += n;
      bar?.update(Math.floor(off / 2 ** 20));
    }
    bar?.stop();
    return out;
  } finally {
    closeSync(fd);
  }
}
