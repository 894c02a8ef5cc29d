/**
 * The delta admin surface (DeltaRegistry) and the engine's way in (`acquire`,
 * `load`): store + formats + validation + cache. Registration parses and
 * validates everything in memory first, so a refused delta never touches the store.
 *
 * Listings, counts and pin budgets come from an in-memory index of the
 * manifests, built at startup and kept by this process's own changes, so a
 * scrape or a listing costs the same at 10 or 10,000 deltas. The store stays
 * the truth replicas share: the index picks up other replicas' registrations
 * and removals by re-reading the folder names (not the manifests) at most
 * every `syncMs`, and only when the folder's mtime says an entry changed, so
 * a quiet store costs one stat(2) per sync, not a 10,000-entry readdir.
 * `get`/`current` always read the one manifest asked for.
 */
import { readFile } from 'node:fs/promises';
import pMap from 'p-map';
import type { BackboneInfo } from '../backbone/types.js';
import type { Logger } from '../log.js';
import { badRequest, ServeError } from '../errors.js';
import { DeltaCache, type CacheHooks, type Lease } from './cache.js';
import { parseOpenDelta } from './formats/opendelta.js';
import { parsePeft } from './formats/peft.js';
import { selectFiles, type Selection } from './formats/select.js';
import { Problems } from './problems.js';
import { DeltaStore, recordOf, TASK_ID, type StoreOptions } from './store.js';
import type { DeltaFile, DeltaPage, DeltaRecord, DeltaRegistry, LoadedDelta } from './types.js';
import { DEFAULT_MAX_RANK, summarize, validateDelta, type ValidDelta } from './validate.js';

export interface RegistryOptions {
  dir: string;
  backbone: BackboneInfo;
  /** The delta cache's byte budget (DELTASERVE_CACHE_BYTES). */
  cacheBytes: number;
  maxRank?: number;
  hooks?: CacheHooks & {
    /** deltaserve_deltas_registered, after startup and every change this process makes. */
    onRegistered?(count: number): void;
  };
  store?: StoreOptions;
  /** Where entries of the store that are not deltas are reported (warn, once each). */
  logger?: Logger;
  /** How stale the index may get before a listing re-reads the store's folder names (other replicas' changes); default 1000 ms. */
  syncMs?: number;
  /**
   * Problems with a delta this server's engine cannot place (modules it has
   * no site of that kind for); each becomes a 422 detail at registration.
   */
  unplaceable?: (delta: ValidDelta) => string[];
}

/**
 * An unchanged folder mtime is trusted only when the last full read began at
 * least this long after it: file times tick coarsely (a jiffy locally, up to a
 * second on some file systems) and a shared store's server clock may differ a
 * little from ours, so a change in the same tick as the one we saw is not missed.
 */
const MTIME_SLACK_MS = 2000;
/** A full read of the folder names at least this often anyway (a file system whose directory mtimes lie). */
const FULL_SYNC_MS = 30_000;

/** Manifests read at once while the index is built at startup. */
const STARTUP_READS = 64;

const notFound = (id: string) => new ServeError(404, 'delta_not_found', `no delta '${id}' is registered`);

/** The file's own name, whatever folder a browser or client put in front of it. */
const baseName = (name: string) => name.replace(/\\/g, '/').split('/').pop() ?? '';

/** Index of the first id greater than `after` in sorted `ids`. */
function firstAfter(ids: string[], after: string): number {
  let lo = 0;
  let hi = ids.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (ids[mid]! <= after) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

export class Registry implements DeltaRegistry {
  readonly cache: DeltaCache;
  private readonly locks = new Map<string, Promise<unknown>>();
  private readonly index = new Map<string, DeltaRecord>();
  /** The index's ids in order, rebuilt lazily after a change. */
  private sorted: string[] | null = null;
  private syncedAt = 0;
  /** The folder's mtime when the names were last read in full, and when that read began (Date.now()). */
  private listed: { mtimeMs: number; at: number } | null = null;
  private syncing: Promise<void> | null = null;
  /** Ids this process changed while a sync was reading the folder: what it read of them may be older. */
  private readonly touchedDuringSync = new Set<string>();

  private constructor(
    private readonly store: DeltaStore,
    private readonly opts: RegistryOptions,
  ) {
    this.cache = new DeltaCache({ maxBytes: opts.cacheBytes, load: (id) => this.load(id), hooks: opts.hooks });
  }

  static async open(opts: RegistryOptions): Promise<Registry> {
    const onForeign = (entry: string, reason: string) =>
      opts.logger?.warn({ entry, reason, dir: opts.dir }, `ignoring '${entry}' in the delta store: not a delta (${reason})`);
    const registry = new Registry(await DeltaStore.open(opts.dir, { onForeign, ...opts.store }), opts);
    const otherBackbone: string[] = [];
    const listed = { mtimeMs: await registry.store.folderMtimeMs(), at: Date.now() };
    const ids = await registry.store.ids();
    // Many manifests in flight at once: read one after another, 10,000 of them took 10–16 s on a busy 2-core VM.
    const manifests = await pMap(ids, (id) => registry.store.read(id), { concurrency: STARTUP_READS });
    for (const [i, id] of ids.entries()) {
      const stored = manifests[i];
      if (!stored) continue;
      registry.remember(recordOf(stored));
      if (stored.manifest.fingerprint !== opts.backbone.fingerprint) otherBackbone.push(id);
    }
    registry.syncedAt = Date.now();
    registry.listed = listed;
    registry.countRegistered();
    registry.warnOtherBackbones(otherBackbone);
    await registry.holdPinned();
    return registry;
  }

  /**
   * A store made for another backbone (`deltaserve serve --model demo:gpt2` on
   * the llama demo's deltas) lists deltas this server answers 422 for; say so
   * at startup rather than per request.
   */
  private warnOtherBackbones(others: string[]): void {
    if (!this.opts.logger || !others.length) return;
    const n = others.length;
    this.opts.logger.warn({ deltas: others, dir: this.opts.dir },
      `${n} delta${n > 1 ? 's' : ''} in the store ${n > 1 ? 'were' : 'was'} registered for another backbone (${others.join(', ')}): ` +
      `requests for ${n > 1 ? 'them' : 'it'} will be refused; serve the backbone they were made for, or point DELTASERVE_DELTAS_DIR at this backbone's store`);
  }

  async register(id: string, files: DeltaFile[], opts: { replace: boolean }): Promise<DeltaRecord> {
    this.checkId(id);
    if (id === this.opts.backbone.name) {
      throw badRequest(`'${id}' is the backbone's own name, which always runs the bare backbone; choose another id`);
    }
    return this.serialized(id, async () => {
      if (!opts.replace && (await this.store.read(id))) {
        throw new ServeError(409, 'delta_exists', `delta '${id}' already exists; register with replace=true to replace it`);
      }
      const subject = `delta '${id}'`;
      const byName = new Map<string, string>();
      for (const f of files) {
        const name = baseName(f.name);
        if (byName.has(name)) new Problems().fail(subject, `two files are named '${name}'; upload each file once`);
        byName.set(name, f.path);
      }
      const selection = selectFiles([...byName.keys()], subject);
      const contents = new Map<string, Uint8Array>();
      for (const name of selection.keep) contents.set(name, await readFile(byName.get(name)!));
      const valid = this.parseAndValidate(subject, selection, contents);
      const unplaceable = this.opts.unplaceable?.(valid) ?? [];
      if (unplaceable.length) {
        const problems = new Problems();
        for (const p of unplaceable) problems.unsupported(p);
        throw problems.toError(subject);
      }

      const previous = opts.replace ? await this.store.read(id) : null;
      const stored = await this.store.write(
        id,
        contents,
        {
          type: valid.type,
          format: valid.format,
          rank: valid.rank,
          fingerprint: this.opts.backbone.fingerprint,
          bytes: valid.bytes,
          sites: summarize(valid, this.opts.backbone),
          // A replaced delta stays pinned, within the budget like any pin.
          ...(previous?.manifest.pinned && this.pinnedBytesWithout(id) + valid.bytes <= this.opts.cacheBytes ? { pinned: true } : {}),
        },
        opts,
      );
      this.cache.invalidate(id);
      const record = recordOf(stored);
      this.remember(record);
      this.countRegistered();
      if (record.pinned) await this.cache.hold(id);
      return record;
    });
  }

  async list(): Promise<DeltaRecord[]> {
    await this.sync();
    return this.sortedIds().map((id) => this.index.get(id)!);
  }

  async page(opts: { limit: number; after?: string }): Promise<DeltaPage> {
    await this.sync();
    const ids = this.sortedIds();
    const start = opts.after === undefined ? 0 : firstAfter(ids, opts.after);
    const slice = ids.slice(start, start + opts.limit);
    return { records: slice.map((id) => this.index.get(id)!), hasMore: start + slice.length < ids.length };
  }

  count(): number {
    // The caller (a scrape) gets this process's view now; other replicas' changes arrive with the next sync.
    void this.sync().catch(() => undefined);
    return this.index.size;
  }

  async get(id: string): Promise<DeltaRecord | null> {
    const stored = await this.store.read(id);
    const record = stored ? recordOf(stored) : null;
    if (record) this.remember(record);
    else this.forget(id);
    return record;
  }

  async remove(id: string): Promise<void> {
    this.checkId(id);
    await this.serialized(id, async () => {
      if (!(await this.store.remove(id))) throw notFound(id);
      this.cache.invalidate(id);
      this.forget(id);
      this.countRegistered();
    });
  }

  async setPinned(id: string, pinned: boolean): Promise<DeltaRecord> {
    this.checkId(id);
    return this.serialized(id, async () => {
      const current = await this.get(id);
      if (!current) throw notFound(id);
      if (pinned && !current.pinned) {
        const others = this.pinnedBytesWithout(id);
        if (others + current.bytes > this.opts.cacheBytes) {
          throw new ServeError(409, 'pin_budget_exceeded',
            `pinning '${id}' (${current.bytes} bytes) would hold ${others + current.bytes} pinned bytes, past the delta cache's budget of ` +
            `${this.opts.cacheBytes} bytes (DELTASERVE_CACHE_BYTES); unpin another delta (PATCH {"pinned": false}) or raise DELTASERVE_CACHE_BYTES`);
        }
      }
      const stored = current.pinned === pinned ? await this.store.read(id) : await this.store.setPinned(id, pinned);
      if (!stored) throw notFound(id);
      const record = recordOf(stored);
      this.remember(record);
      // The manifest's hash is the delta's version: the cached copy is of the old one, so load it again under the new.
      if (stored.sha256 !== current.sha256) this.cache.invalidate(id);
      if (pinned) await this.cache.hold(id);
      else this.cache.unhold(id);
      return record;
    });
  }

  /**
   * Whether `id` is registered, read from the store (the truth replicas
   * share). A cached version the store no longer holds (another replica
   * replaced or removed it) is dropped, so the next acquire loads what the
   * store has; requests running on the old version keep it.
   */
  async current(id: string): Promise<DeltaRecord | null> {
    const record = await this.get(id);
    const cached = this.cache.version(id);
    if (cached !== null && cached !== record?.sha256) {
      this.cache.invalidate(id);
      // Pinned by another replica, or replaced there while pinned: hold the new version too.
      if (record?.pinned) void this.cache.hold(id).catch(() => undefined);
    }
    return record;
  }

  isCached(id: string): boolean {
    return this.cache.has(id);
  }

  /** Pins the current version of a delta for one engine step; waits while the cache's bytes are all pinned. */
  acquire(id: string): Promise<Lease> {
    return this.cache.acquire(id);
  }

  /** Reads a delta from the store and validates it against the backbone again, bypassing the cache. */
  async load(id: string): Promise<LoadedDelta> {
    const stored = await this.store.readFiles(id);
    if (!stored) throw notFound(id);
    const selection = selectFiles([...stored.files.keys()], `stored delta '${id}'`);
    const valid = this.parseAndValidate(`stored delta '${id}'`, selection, stored.files);
    return { id, version: stored.sha256, ...valid };
  }

  private parseAndValidate(subject: string, selection: Selection, files: Map<string, Uint8Array>): ValidDelta {
    const problems = new Problems();
    const candidate =
      selection.format === 'peft'
        ? parsePeft(files, problems, subject)
        : parseOpenDelta(files, selection.weights, problems, subject);
    return validateDelta(candidate, this.opts.backbone, { maxRank: this.opts.maxRank ?? DEFAULT_MAX_RANK }, problems, subject);
  }

  private checkId(id: string): void {
    if (!TASK_ID.test(id)) {
      throw badRequest(`delta id '${id}' is invalid: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit`);
    }
  }

  /** One registration or removal per id at a time in this process; across replicas, rename(2) decides. */
  private serialized<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(id) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    const settled = next.catch(() => undefined);
    this.locks.set(id, settled);
    void settled.then(() => {
      if (this.locks.get(id) === settled) this.locks.delete(id);
    });
    return next;
  }

  private countRegistered(): void {
    this.opts.hooks?.onRegistered?.(this.index.size);
  }

  private remember(record: DeltaRecord): void {
    if (this.syncing) this.touchedDuringSync.add(record.id);
    if (!this.index.has(record.id)) this.sorted = null;
    this.index.set(record.id, record);
  }

  private forget(id: string): void {
    if (this.syncing) this.touchedDuringSync.add(id);
    if (this.index.delete(id)) this.sorted = null;
  }

  private sortedIds(): string[] {
    return (this.sorted ??= [...this.index.keys()].sort());
  }

  private pinnedBytesWithout(id: string): number {
    let bytes = 0;
    for (const r of this.index.values()) if (r.pinned && r.id !== id) bytes += r.bytes;
    return bytes;
  }

  /** Loads every pinned delta at startup, in id order, while the budget allows (a store edited by hand may pin more). */
  private async holdPinned(): Promise<void> {
    let bytes = 0;
    for (const id of this.sortedIds()) {
      const r = this.index.get(id)!;
      if (!r.pinned || bytes + r.bytes > this.opts.cacheBytes) continue;
      try {
        await this.cache.hold(id);
        bytes += r.bytes;
      } catch {
        // A pinned delta that no longer loads is reported when a request asks for it, not at startup.
      }
    }
  }

  /**
   * Brings the index up to date with the store's folder names when it is
   * older than `syncMs` and the folder changed since they were last read:
   * manifests are read only for ids this process has not seen, so a sync costs
   * one stat when nothing changed and one readdir when something did elsewhere.
   */
  private sync(): Promise<void> {
    if (Date.now() - this.syncedAt < (this.opts.syncMs ?? 1000)) return Promise.resolve();
    return (this.syncing ??= (async () => {
      try {
        const began = Date.now();
        // Before the readdir: a change between the two moves the mtime again, and the next sync reads the names.
        const mtimeMs = await this.store.folderMtimeMs();
        const l = this.listed;
        if (l && mtimeMs === l.mtimeMs && l.at - mtimeMs >= MTIME_SLACK_MS && began - l.at < FULL_SYNC_MS) {
          this.syncedAt = Date.now();
          return;
        }
        const ids = new Set(await this.store.ids());
        const known = (id: string) => this.touchedDuringSync.has(id);
        for (const id of [...this.index.keys()]) if (!ids.has(id) && !known(id)) this.forget(id);
        for (const id of ids) {
          if (this.index.has(id) || known(id)) continue;
          const stored = await this.store.read(id);
          if (stored && !known(id)) this.remember(recordOf(stored));
        }
        this.listed = { mtimeMs, at: began };
        this.syncedAt = Date.now();
        this.countRegistered();
      } finally {
        this.syncing = null;
        this.touchedDuringSync.clear();
      }
    })());
  }
}
