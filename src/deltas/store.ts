/**
 * The delta store: one folder per delta under the deltas dir, holding the
 * files as uploaded plus manifest.json. It is the source of truth and may be
 * shared by replicas, so nothing is cached here: every read goes to disk.
 *
 * Crash safety comes from rename(2) being atomic:
 *   register  write `.tmp-<pid>@<host>-<rand>/` (files, fsync, manifest last), rename it to `<id>`
 *   replace   rename `<id>` to `.old-<id>.<rand>`, rename the temp to `<id>`, remove the old
 *   remove    rename `<id>` to `.trash-<rand>`, then remove that
 * A crash leaves either the old or the new state, plus dot-folders that
 * `open` cleans up (an `.old-` with no `<id>` beside it is renamed back; a
 * `.tmp-` whose writer on this host is dead goes at once, others by age).
 *
 * Anything else in the folder (a README, an empty folder, a folder whose
 * manifest is not one) is not a delta: it is ignored and reported once through
 * `onForeign`, never an error for the routes that list or read deltas.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, open, readdir, readFile, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ownerTag, sweepLeftBehind } from '../temp-owner.js';
import { ServeError } from '../errors.js';
import type { DeltaFormat, DeltaRecord, DeltaType, SiteSummary } from './types.js';

export const TASK_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
export const MANIFEST = 'manifest.json';
const TMP = '.tmp-';
const OLD = '.old-';
const TRASH = '.trash-';

export interface Manifest {
  id: string;
  type: DeltaType;
  format: DeltaFormat;
  rank: number;
  /** sha256 of each stored file, by name. */
  files: Record<string, string>;
  fingerprint: string;
  created_at: string;
  /** Bytes of parameter data once loaded (what the cache charges). */
  bytes: number;
  /** Bytes of the stored files. */
  file_bytes: number;
  sites: SiteSummary[];
  /** Kept in the cache whatever the traffic (PATCH /v1/deltas/{id}); absent in manifests written before pinning existed. */
  pinned?: boolean;
}

export interface StoredDelta {
  manifest: Manifest;
  /** sha256 of the delta's content (its files' names and hashes), not of when it was written: the delta's version. */
  sha256: string;
}

/** Points where a test can stop a write to check what a crash there leaves behind. */
export type WriteStep = 'temp-partial' | 'temp-written' | 'old-aside' | 'new-in';

export interface StoreOptions {
  /** Leftover temp folders younger than this may belong to a replica still writing; default 10 minutes. */
  staleTempMs?: number;
  onStep?: (step: WriteStep) => Promise<void> | void;
  /** An entry of the store's folder that is not a delta; reported once per entry. */
  onForeign?: (entry: string, reason: string) => void;
}

export const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');

/** The delta's version: one hash over its files' names and hashes, so identical uploads get identical versions. */
export function contentSha256(files: Record<string, string>): string {
  const h = createHash('sha256');
  for (const name of Object.keys(files).sort()) h.update(`${name}\0${files[name]}\n`);
  return h.digest('hex');
}

/** A parsed manifest.json that has what a delta needs, or the reason it is not one. */
function checkManifest(value: unknown, id: string): Manifest | string {
  if (!value || typeof value !== 'object') return 'manifest.json is not an object';
  const m = value as Partial<Manifest>;
  if (m.id !== id) return `manifest.json names the delta '${String(m.id)}', not '${id}'`;
  if (!m.files || typeof m.files !== 'object' || Object.values(m.files).some((h) => typeof h !== 'string')) {
    return 'manifest.json has no file hashes';
  }
  if (!Array.isArray(m.sites)) return 'manifest.json has no sites';
  return m as Manifest;
}

export function recordOf(stored: StoredDelta): DeltaRecord {
  const m = stored.manifest;
  return { id: m.id, type: m.type, format: m.format, rank: m.rank, bytes: m.bytes, sha256: stored.sha256, createdAt: m.created_at, sites: m.sites, pinned: m.pinned === true };
}

async function writeDurably(path: string, bytes: Uint8Array): Promise<void> {
  const fh = await open(path, 'wx');
  try {
    await fh.writeFile(bytes);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** A rename is durable only once the folder holding the entry is synced. */
async function syncDir(path: string): Promise<void> {
  const fh = await open(path, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

const manifestBytesOf = (m: Manifest) => Buffer.from(JSON.stringify(m, null, 2) + '\n', 'utf8');

const isMissing = (err: unknown) => (err as NodeJS.ErrnoException).code === 'ENOENT';

export class DeltaStore {
  /** Entries already reported as foreign, so a listing every few seconds does not flood the log. */
  private readonly reported = new Set<string>();

  private constructor(
    readonly dir: string,
    private readonly opts: StoreOptions,
  ) {}

  static async open(dir: string, opts: StoreOptions = {}): Promise<DeltaStore> {
    await mkdir(dir, { recursive: true });
    const store = new DeltaStore(dir, opts);
    await store.recover();
    return store;
  }

  private async recover(): Promise<void> {
    const staleMs = this.opts.staleTempMs ?? 10 * 60_000;
    const entries = await readdir(this.dir);
    const ids = new Set(entries.filter((e) => TASK_ID.test(e)));
    for (const entry of entries) {
      const path = join(this.dir, entry);
      if (entry.startsWith(OLD)) {
        const id = entry.slice(OLD.length, entry.lastIndexOf('.'));
        // No `<id>`: the crash came between the two renames of a replace, so the old version is still the truth.
        if (!ids.has(id) && TASK_ID.test(id)) {
          await rename(path, join(this.dir, id));
          ids.add(id);
        } else {
          await rm(path, { recursive: true, force: true });
        }
      } else if (entry.startsWith(TRASH)) {
        await rm(path, { recursive: true, force: true });
      }
    }
    await sweepLeftBehind(this.dir, TMP, staleMs);
    await syncDir(this.dir);
  }

  /**
   * The store folder's mtime (ms): it moves whenever an entry is added,
   * removed or renamed in it (every write, replace and removal ends in a
   * rename or rm there), so an unchanged value means `ids()` would answer as before.
   */
  async folderMtimeMs(): Promise<number> {
    return (await stat(this.dir)).mtimeMs;
  }

  /** Folders named like a delta id; a few may be foreign (read() says which). */
  async ids(): Promise<string[]> {
    const entries = await readdir(this.dir, { withFileTypes: true });
    for (const e of entries) if (!e.isDirectory() && TASK_ID.test(e.name)) this.foreign(e.name, 'it is not a folder');
    return entries.filter((e) => e.isDirectory() && TASK_ID.test(e.name)).map((e) => e.name).sort();
  }

  private foreign(entry: string, reason: string): void {
    if (this.reported.has(entry)) return;
    this.reported.add(entry);
    this.opts.onForeign?.(entry, reason);
  }

  /** The delta's manifest, or null (also for a foreign entry). During another process's replace it reads the version being replaced. */
  async read(id: string): Promise<StoredDelta | null> {
    const folder = await this.locate(id);
    if (!folder) return null;
    let bytes: Buffer;
    try {
      bytes = await readFile(join(folder, MANIFEST));
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOTDIR') this.foreign(id, 'it is not a folder');
      else if (isMissing(err) && (await exists(join(this.dir, id)))) this.foreign(id, 'it has no manifest.json');
      if (isMissing(err) || code === 'ENOTDIR') return null;
      throw err;
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(bytes.toString('utf8'));
    } catch (err) {
      this.foreign(id, `its manifest.json is not valid JSON (${(err as Error).message})`);
      return null;
    }
    const manifest = checkManifest(parsed, id);
    if (typeof manifest === 'string') {
      this.foreign(id, manifest);
      return null;
    }
    return { manifest, sha256: contentSha256(manifest.files) };
  }

  /** The manifest and every file, each checked against its recorded sha256. */
  async readFiles(id: string): Promise<(StoredDelta & { files: Map<string, Uint8Array> }) | null> {
    // A replace elsewhere may move the folder between our reads: retry once from the top.
    for (let attempt = 0; ; attempt++) {
      try {
        const stored = await this.read(id);
        if (!stored) return null;
        const folder = (await this.locate(id))!;
        const files = new Map<string, Uint8Array>();
        for (const [name, hash] of Object.entries(stored.manifest.files)) {
          const bytes = await readFile(join(folder, name));
          if (sha256(bytes) !== hash) {
            throw new ServeError(500, 'internal_error', `stored delta '${id}' is corrupt: ${name} does not match its sha256 in the manifest`);
          }
          files.set(name, bytes);
        }
        return { ...stored, files };
      } catch (err) {
        if (attempt > 0 || !isMissing(err)) throw err;
      }
    }
  }

  private async locate(id: string): Promise<string | null> {
    if (!TASK_ID.test(id)) return null;
    const path = join(this.dir, id);
    if (await exists(path)) return path;
    const aside = (await readdir(this.dir)).find((e) => e.startsWith(`${OLD}${id}.`));
    return aside ? join(this.dir, aside) : null;
  }

  /** Writes a delta atomically. Throws 409 when it exists and `replace` is false. */
  async write(
    id: string,
    files: Map<string, Uint8Array>,
    manifest: Omit<Manifest, 'id' | 'files' | 'file_bytes' | 'created_at'>,
    opts: { replace: boolean },
  ): Promise<StoredDelta> {
    const target = join(this.dir, id);
    if (!opts.replace && (await exists(target))) throw exists409(id);
    const full: Manifest = {
      id,
      ...manifest,
      files: Object.fromEntries([...files].map(([name, bytes]) => [name, sha256(bytes)])),
      file_bytes: [...files.values()].reduce((n, b) => n + b.byteLength, 0),
      created_at: new Date().toISOString(),
    };
    const manifestBytes = manifestBytesOf(full);

    const temp = join(this.dir, `${TMP}${ownerTag()}${randomBytes(8).toString('hex')}`);
    await mkdir(temp);
    try {
      for (const [name, bytes] of files) {
        await writeDurably(join(temp, name), bytes);
        await this.opts.onStep?.('temp-partial');
      }
      // The manifest goes last: a folder with a manifest is a complete delta.
      await writeDurably(join(temp, MANIFEST), manifestBytes);
      await syncDir(temp);
      await this.opts.onStep?.('temp-written');
      await this.swapIn(id, temp, opts.replace);
    } catch (err) {
      await rm(temp, { recursive: true, force: true });
      throw err;
    }
    return { manifest: full, sha256: contentSha256(full.files) };
  }

  private async swapIn(id: string, temp: string, replace: boolean): Promise<void> {
    const target = join(this.dir, id);
    let aside: string | null = null;
    if (replace && (await exists(target))) {
      aside = join(this.dir, `${OLD}${id}.${randomBytes(8).toString('hex')}`);
      await rename(target, aside);
      await this.opts.onStep?.('old-aside');
    }
    try {
      // rename(2) refuses to replace a non-empty folder, so two replicas registering one id cannot both win.
      await rename(temp, target);
    } catch (err) {
      if (aside) await rename(aside, target);
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOTEMPTY' || code === 'EEXIST') throw exists409(id);
      throw err;
    }
    await syncDir(this.dir);
    await this.opts.onStep?.('new-in');
    if (aside) await rm(aside, { recursive: true, force: true });
  }

  /**
   * Sets the manifest's `pinned` flag in place: the new manifest is written
   * to a temp file and renamed over the old one, so readers see one or the other.
   * Null when there is no such delta.
   */
  async setPinned(id: string, pinned: boolean): Promise<StoredDelta | null> {
    const stored = await this.read(id);
    if (!stored) return null;
    const manifest: Manifest = { ...stored.manifest, pinned };
    const bytes = manifestBytesOf(manifest);
    const folder = join(this.dir, id);
    // Among the store's other temps (owner-named): a writer killed before the rename leaves nothing the startup sweep misses.
    const temp = join(this.dir, `${TMP}${ownerTag()}${randomBytes(8).toString('hex')}`);
    try {
      await writeDurably(temp, bytes);
      await rename(temp, join(folder, MANIFEST));
    } catch (err) {
      await rm(temp, { force: true });
      // The folder went away (removed or being replaced elsewhere): report what the store holds now.
      if (isMissing(err)) return null;
      throw err;
    }
    await syncDir(folder);
    return { manifest, sha256: contentSha256(manifest.files) };
  }

  /** Removes a delta; false when there was none. */
  async remove(id: string): Promise<boolean> {
    if (!TASK_ID.test(id)) return false;
    const trash = join(this.dir, `${TRASH}${randomBytes(8).toString('hex')}`);
    try {
      await rename(join(this.dir, id), trash);
    } catch (err) {
      if (isMissing(err)) return false;
      throw err;
    }
    await syncDir(this.dir);
    await rm(trash, { recursive: true, force: true });
    return true;
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch (err) {
    if (isMissing(err)) return false;
    throw err;
  }
}

const exists409 = (id: string) =>
  new ServeError(409, 'delta_exists', `delta '${id}' already exists; register with replace=true to replace it`);
