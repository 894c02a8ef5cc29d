/**
 * The delta admin surface (DeltaRegistry) and the engine's way in (`acquire`,
 * `load`): store + formats + validation + cache. Registration parses and
 * validates everything in memory first, so a refused delta never touches the store.
 */
import { readFile } from 'node:fs/promises';
import type { BackboneInfo } from '../backbone/types.js';
import type { Logger } from '../log.js';
import { badRequest, ServeError } from '../errors.js';
import { DeltaCache, type CacheHooks, type Lease } from './cache.js';
import { parseOpenDelta } from './formats/opendelta.js';
import { parsePeft } from './formats/peft.js';
import { selectFiles, type Selection } from './formats/select.js';
import { Problems } from './problems.js';
import { DeltaStore, recordOf, TASK_ID, type StoreOptions } from './store.js';
import type { DeltaFile, DeltaRecord, DeltaRegistry, LoadedDelta } from './types.js';
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
  /**
   * Problems with a delta this server's engine cannot place (modules it has
   * no site of that kind for); each becomes a 422 detail at registration.
   */
  unplaceable?: (delta: ValidDelta) => string[];
}

const notFound = (id: string) => new ServeError(404, 'delta_not_found', `no delta '${id}' is registered`);

/** The file's own name, whatever folder a browser or client put in front of it. */
const baseName = (name: string) => name.replace(/\\/g, '/').split('/').pop() ?? '';

export class Registry implements DeltaRegistry {
  readonly cache: DeltaCache;
  private readonly locks = new Map<string, Promise<unknown>>();

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
    await registry.countRegistered();
    await registry.warnOtherBackbones();
    return registry;
  }

  /**
   * A store made for another backbone (`deltaserve serve --model demo:gpt2` on
   * the llama demo's deltas) lists deltas this server answers 422 for; say so
   * at startup rather than per request.
   */
  private async warnOtherBackbones(): Promise<void> {
    if (!this.opts.logger) return;
    const others: string[] = [];
    for (const id of await this.store.ids()) {
      const stored = await this.store.read(id);
      if (stored && stored.manifest.fingerprint !== this.opts.backbone.fingerprint) others.push(id);
    }
    if (!others.length) return;
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
        },
        opts,
      );
      this.cache.invalidate(id);
      await this.countRegistered();
      return recordOf(stored);
    });
  }

  async list(): Promise<DeltaRecord[]> {
    const records: DeltaRecord[] = [];
    for (const id of await this.store.ids()) {
      const stored = await this.store.read(id);
      if (stored) records.push(recordOf(stored));
    }
    return records;
  }

  async get(id: string): Promise<DeltaRecord | null> {
    const stored = await this.store.read(id);
    return stored ? recordOf(stored) : null;
  }

  async remove(id: string): Promise<void> {
    this.checkId(id);
    await this.serialized(id, async () => {
      if (!(await this.store.remove(id))) throw notFound(id);
      this.cache.invalidate(id);
      await this.countRegistered();
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
    if (cached !== null && cached !== record?.sha256) this.cache.invalidate(id);
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

  private async countRegistered(): Promise<void> {
    const hook = this.opts.hooks?.onRegistered;
    if (hook) hook((await this.list()).length);
  }
}
