/**
 * multipart/form-data delta uploads, streamed to a private temporary folder
 * with the size limit enforced while the bytes arrive (nothing is held in
 * memory). Each file part keeps its own filename (whatever its field is
 * called), since the delta formats are recognised by file names; names that
 * could escape the folder are refused, not rewritten, so a client learns its
 * upload was wrong.
 *
 * The temporary folder goes on every exit path: registered, refused, or the
 * client gone mid-upload (every file stream is destroyed, so nothing waits on
 * bytes that will never come). A process killed mid-upload cannot clean up, so
 * its folders carry its pid and the next start sweeps them (sweepUploadTemps).
 */
import { createWriteStream } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { Request } from 'express';
import busboy from 'busboy';
import type { DeltaFile } from '../deltas/types.js';
import { ServeError } from '../errors.js';
import { ownerTag, sweepLeftBehind } from '../temp-owner.js';

const PREFIX = 'deltaserve-upload-';
/** Upload folders of another host (a shared temp folder) or an older naming are swept only once this old. */
const STALE_MS = 60 * 60_000;

export interface UploadLimits {
  /** All files together. */
  maxBytes: number;
  maxFiles: number;
  /** Where each upload's temporary folder is made; default the OS's temp folder. */
  tmpDir?: string | null;
}

/** Removes upload folders left by processes that died mid-upload; run at startup. */
export function sweepUploadTemps(tmpDir: string | null = null): Promise<number> {
  return sweepLeftBehind(tmpDir ?? tmpdir(), PREFIX, STALE_MS);
}

export interface Upload {
  fields: Record<string, string>;
  files: DeltaFile[];
  /** Removes the temporary folder and what is left in it. */
  cleanup(): Promise<void>;
}

const tooLarge = (limit: number) =>
  new ServeError(413, 'payload_too_large', `the upload is larger than the limit of ${limit} bytes (DELTASERVE_MAX_UPLOAD_BYTES)`);

export function checkFilename(name: string): string | null {
  if (!name) return 'a file part has an empty filename';
  if (name === '.' || name === '..' || /[/\\\0]/.test(name)) {
    return `filename "${name}" must be a plain file name, without path separators or ".."`;
  }
  if (Buffer.byteLength(name) > 255) return `filename "${name.slice(0, 40)}…" is longer than 255 bytes`;
  return null;
}

export const isMultipart = (req: Request) => /^multipart\/form-data\b/i.test(req.headers['content-type'] ?? '');

export async function receiveUpload(req: Request, limits: UploadLimits): Promise<Upload> {
  const declared = Number(req.headers['content-length']);
  if (Number.isFinite(declared) && declared > limits.maxBytes) {
    req.resume();
    throw tooLarge(limits.maxBytes);
  }
  const parent = limits.tmpDir ?? tmpdir();
  await mkdir(parent, { recursive: true });
  const dir = await mkdtemp(join(parent, `${PREFIX}${ownerTag()}`));
  const cleanup = () => rm(dir, { recursive: true, force: true });
  try {
    const { fields, files } = await parse(req, dir, limits);
    return { fields, files, cleanup };
  } catch (err) {
    await cleanup();
    throw err;
  }
}

function parse(req: Request, dir: string, limits: UploadLimits): Promise<Omit<Upload, 'cleanup'>> {
  return new Promise((resolve, reject) => {
    const fields: Record<string, string> = {};
    const files: DeltaFile[] = [];
    const writes: Promise<void>[] = [];
    const streams: Readable[] = [];
    let total = 0;
    let failed: ServeError | null = null;

    let bb: busboy.Busboy;
    try {
      bb = busboy({
        headers: req.headers,
        preservePath: true,
        limits: { fileSize: limits.maxBytes, files: limits.maxFiles, fields: 16, fieldSize: 4096 },
      });
    } catch (err) {
      req.resume();
      reject(new ServeError(400, 'bad_request', `malformed multipart request: ${(err as Error).message}`));
      return;
    }

    // The first problem wins; the rest of the body is read and dropped so the client sees the answer, not a reset.
    // Open file streams are destroyed: with busboy unpiped they would never end, and their writes never settle.
    const fail = (e: ServeError) => {
      if (failed) return;
      failed = e;
      req.unpipe(bb);
      req.resume();
      for (const s of streams) s.destroy(e);
      Promise.allSettled(writes).then(() => reject(e));
    };

    bb.on('file', (_field, stream, info) => {
      const name = info.filename ?? '';
      const problem = checkFilename(name) ?? (files.some((f) => f.name === name) ? `file "${name}" appears twice` : null);
      if (failed || problem) {
        stream.resume();
        if (problem) fail(new ServeError(400, 'bad_request', problem));
        return;
      }
      const path = join(dir, name);
      files.push({ name, path });
      streams.push(stream);
      const meter = new Transform({
        transform(chunk: Buffer, _enc, done) {
          total += chunk.length;
          if (total > limits.maxBytes) done(tooLarge(limits.maxBytes));
          else done(null, chunk);
        },
      });
      stream.on('limit', () => meter.destroy(tooLarge(limits.maxBytes)));
      writes.push(
        pipeline(stream, meter, createWriteStream(path, { flags: 'wx' })).catch((err: unknown) => {
          stream.resume();
          fail(err instanceof ServeError ? err : new ServeError(400, 'bad_request', `upload of "${name}" failed: ${(err as Error).message}`));
        }),
      );
    });

    bb.on('field', (name, value, info) => {
      if (info.valueTruncated) fail(new ServeError(400, 'bad_request', `form field "${name}" is too long`));
      else if (Object.hasOwn(fields, name)) fail(new ServeError(400, 'bad_request', `form field "${name}" appears twice; send it once`));
      else fields[name] = value;
    });
    bb.on('filesLimit', () => fail(new ServeError(413, 'payload_too_large', `an upload holds at most ${limits.maxFiles} files`)));
    bb.on('fieldsLimit', () => fail(new ServeError(400, 'bad_request', 'too many form fields')));
    bb.on('error', (err: Error) => fail(new ServeError(400, 'bad_request', `malformed multipart body: ${err.message}`)));
    bb.on('close', () => {
      Promise.allSettled(writes).then(() => {
        if (!failed) resolve({ fields, files });
      });
    });
    // 'close' before the body was complete: the client is gone (a reset, a timeout, a crash).
    req.on('close', () => {
      if (!req.complete) fail(new ServeError(400, 'bad_request', 'the client aborted the upload'));
    });
    req.pipe(bb);
  });
}
