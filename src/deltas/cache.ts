/**
 * Deltas ready for the engine's banks, bounded by bytes.
 *
 * A delta in use (leased by `acquire`) is pinned: it lives outside the LRU, so
 * it can never be evicted, but its bytes still count against the budget. Only
 * unpinned deltas sit in the LRU, ordered by when they were last released.
 * When a newly loaded delta does not fit even after evicting everything
 * unpinned, `acquire` waits for a release instead of failing: the scheduler
 * sees backpressure, not errors.
 *
 * A delta pinned by an admin (PATCH /v1/deltas/{id}) is *held*: the cache keeps
 * a lease on it for as long as the pin lasts, so it is never evicted. Held
 * bytes are not what a waiting admission waits for (they never come back on
 * their own), so an admission that only held deltas block goes ahead.
 */
import { LRUCache } from 'lru-cache';
import type { LoadedDelta } from './types.js';

/** How the metrics module observes the cache (deltaserve_delta_cache_*, deltaserve_delta_load_seconds). */
export interface CacheHooks {
  onHit?(id: string): void;
  onMiss?(id: string): void;
  onEvict?(id: string): void;
  /** Bytes held, pinned and unpinned, after every change. */
  onBytes?(bytes: number): void;
  onLoadSeconds?(seconds: number): void;
}

export interface Lease {
  delta: LoadedDelta;
  /** Unpins; call exactly once, when the step using the delta is done. */
  release(): void;
}

export interface CacheOptions {
  maxBytes: number;
  load: (id: string) => Promise<LoadedDelta>;
  hooks?: CacheHooks;
}

interface Pin {
  id: string;
  count: number;
  /** False once the id was replaced or removed: on release the delta is dropped, not cached. */
  current: boolean;
}

interface Flight {
  promise: Promise<LoadedDelta>;
  /** Acquirers waiting on this load; admission pins the delta once for each. */
  state: { waiters: number };
}

const sizeOf = (d: LoadedDelta) => Math.max(1, d.bytes);

export class DeltaCache {
  private readonly lru: LRUCache<string, LoadedDelta>;
  private readonly pins = new Map<LoadedDelta, Pin>();
  private readonly pinnedCurrent = new Map<string, LoadedDelta>();
  private readonly flights = new Map<string, Flight>();
  private pinnedBytes = 0;
  /** Leases kept for admin pins, by id; their bytes are part of pinnedBytes. */
  private readonly held = new Map<string, Lease>();
  private heldBytes = 0;
  private wakeups: (() => void)[] = [];

  constructor(private readonly opts: CacheOptions) {
    this.lru = new LRUCache<string, LoadedDelta>({
      maxSize: opts.maxBytes,
      sizeCalculation: sizeOf,
      dispose: (_value, id, reason) => {
        if (reason === 'evict') opts.hooks?.onEvict?.(id);
      },
    });
  }

  /** Bytes held: pinned deltas plus the LRU. */
  get bytes(): number {
    return this.pinnedBytes + this.lru.calculatedSize;
  }

  /** Whether the current version of `id` is in memory. */
  has(id: string): boolean {
    return this.pinnedCurrent.has(id) || this.lru.has(id);
  }

  /** The version (manifest sha256) of `id` held in memory, if any. */
  version(id: string): string | null {
    return (this.pinnedCurrent.get(id) ?? this.lru.peek(id))?.version ?? null;
  }

  /** Ids in the LRU, least recently released first (the next to be evicted). */
  evictionOrder(): string[] {
    return [...this.lru.rkeys()];
  }

  async acquire(id: string): Promise<Lease> {
    const resident = this.pinResident(id);
    if (resident) {
      this.opts.hooks?.onHit?.(id);
      return this.lease(resident);
    }
    this.opts.hooks?.onMiss?.(id);
    let flight = this.flights.get(id);
    if (!flight) {
      const state = { waiters: 0 };
      flight = { state, promise: this.loadAndAdmit(id, state) };
      this.flights.set(id, flight);
    }
    flight.state.waiters++;
    return this.lease(await flight.promise);
  }

  /** Ids held for admin pins. */
  heldIds(): string[] {
    return [...this.held.keys()];
  }

  /** Loads `id` if needed and keeps it until `unhold` (or `invalidate`). */
  async hold(id: string): Promise<void> {
    if (this.held.has(id)) return;
    const lease = await this.acquire(id);
    // A concurrent hold, or an invalidate while loading (the lease is then of a stale version), wins.
    if (this.held.has(id) || this.version(id) !== lease.delta.version) return lease.release();
    this.held.set(id, lease);
    this.heldBytes += sizeOf(lease.delta);
  }

  /** Ends a hold; the delta goes back to the LRU like any released one. */
  unhold(id: string): void {
    const lease = this.held.get(id);
    if (!lease) return;
    this.held.delete(id);
    this.heldBytes -= sizeOf(lease.delta);
    lease.release();
  }

  /** The next acquire of `id` loads it afresh; holders of the current version keep it until they release. A hold ends. */
  invalidate(id: string): void {
    this.unhold(id);
    this.flights.delete(id);
    this.lru.delete(id);
    const pinned = this.pinnedCurrent.get(id);
    if (pinned) {
      this.pins.get(pinned)!.current = false;
      this.pinnedCurrent.delete(id);
    }
    this.changed();
  }

  private pinResident(id: string): LoadedDelta | null {
    const pinned = this.pinnedCurrent.get(id);
    if (pinned) {
      this.pins.get(pinned)!.count++;
      return pinned;
    }
    const cached = this.lru.get(id);
    if (!cached) return null;
    // Moving between the LRU and the pinned set leaves the byte total unchanged.
    this.lru.delete(id);
    this.pin(id, cached, 1, true);
    return cached;
  }

  private pin(id: string, delta: LoadedDelta, count: number, current: boolean): void {
    this.pins.set(delta, { id, count, current });
    if (current) this.pinnedCurrent.set(id, delta);
    this.pinnedBytes += sizeOf(delta);
  }

  private async loadAndAdmit(id: string, state: Flight['state']): Promise<LoadedDelta> {
    const isCurrent = () => this.flights.get(id)?.state === state;
    try {
      const started = performance.now();
      const delta = await this.opts.load(id);
      this.opts.hooks?.onLoadSeconds?.((performance.now() - started) / 1000);
      await this.admit(delta, () => {
        // Still this id's flight unless invalidate() ran meanwhile: then this version is already stale.
        this.pin(id, delta, state.waiters, isCurrent());
      });
      return delta;
    } finally {
      if (isCurrent()) this.flights.delete(id);
    }
  }

  /**
   * Evicts least recently released deltas until `delta` fits, waiting for
   * releases while pinned deltas fill the budget, then pins it in the same
   * tick as the check so two admissions cannot both take the last bytes. A
   * delta that does not fit is admitted once nothing but held deltas is
   * pinned (one larger than the whole budget, or one beside held deltas that
   * leave it no room), so it can still run: the budget is then passed by
   * that one delta until it is released and evicted.
   */
  private async admit(delta: LoadedDelta, pin: () => void): Promise<void> {
    const size = sizeOf(delta);
    for (;;) {
      while (this.bytes + size > this.opts.maxBytes && this.lru.size > 0) this.lru.pop();
      if (this.bytes + size <= this.opts.maxBytes || this.pinnedBytes === this.heldBytes) {
        pin();
        this.changed();
        return;
      }
      await new Promise<void>((resolve) => this.wakeups.push(resolve));
    }
  }

  private lease(delta: LoadedDelta): Lease {
    let released = false;
    return {
      delta,
      release: () => {
        if (released) return;
        released = true;
        this.unpin(delta);
      },
    };
  }

  private unpin(delta: LoadedDelta): void {
    const pin = this.pins.get(delta)!;
    if (--pin.count > 0) return;
    this.pins.delete(delta);
    this.pinnedBytes -= sizeOf(delta);
    if (pin.current) {
      this.pinnedCurrent.delete(pin.id);
      if (sizeOf(delta) <= this.opts.maxBytes) this.lru.set(pin.id, delta);
      else this.opts.hooks?.onEvict?.(pin.id);
    }
    this.changed();
  }

  private changed(): void {
    this.opts.hooks?.onBytes?.(this.bytes);
    const wake = this.wakeups;
    this.wakeups = [];
    for (const w of wake) w();
  }
}
