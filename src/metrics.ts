/**
 * Prometheus metrics. Names, types and labels of the contract table are fixed
 * (the Gateway API Inference Extension routes on the first four).
 *
 * Ownership, so that nothing is counted twice:
 * - HTTP layer: observeRequest, observeTtft, observeTpot, addTokens (it sees a
 *   request from arrival to last byte), setDeltasRegistered on each scrape.
 * - scheduler: setQueue, observeBatch, setLoraInfo, setKvUsage.
 * - delta cache: cacheHit, cacheMiss, cacheEvict, setCacheBytes, observeDeltaLoad.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/** The label for requests without a delta; task ids start with [A-Za-z0-9], so it cannot collide. */
export const BASE_TASK_LABEL = '_base';
export const OTHER_TASK_LABEL = 'other';

/**
 * Keeps the `task` label bounded: at most `max` tasks hold a label of their
 * own, chosen by request count; the rest are `other`. A task displaces the
 * least busy holder only once it has twice that holder's count, so labels do
 * not flap; the displaced task's series are removed (`onEvict`), which keeps
 * the number of series bounded for good. Counts are halved when the tally
 * grows large, so the ranking follows recent traffic.
 */
export class TaskLabeler {
  private readonly counts = new Map<string, number>();
  private readonly holders = new Set<string>();

  constructor(
    private readonly max: number,
    private readonly onEvict: (task: string) => void = () => {},
    private readonly tallyLimit = Math.max(1000, max * 50),
  ) {}

  label(task: string | null): string {
    if (task === null) return BASE_TASK_LABEL;
    if (task === OTHER_TASK_LABEL) return OTHER_TASK_LABEL;
    const count = (this.counts.get(task) ?? 0) + 1;
    this.counts.set(task, count);
    if (this.counts.size > this.tallyLimit) this.decay();
    if (this.holders.has(task)) return task;
    if (this.holders.size < this.max) {
      this.holders.add(task);
      return task;
    }
    let weakest: string | null = null;
    let weakestCount = Infinity;
    for (const h of this.holders) {
      const c = this.counts.get(h) ?? 0;
      if (c < weakestCount) [weakest, weakestCount] = [h, c];
    }
    if (weakest !== null && count >= 2 * Math.max(1, weakestCount)) {
      this.holders.delete(weakest);
      this.holders.add(task);
      this.onEvict(weakest);
      return task;
    }
    return OTHER_TASK_LABEL;
  }

  /** Existing holder labels, without counting a request. */
  peek(task: string | null): string {
    if (task === null) return BASE_TASK_LABEL;
    return this.holders.has(task) ? task : OTHER_TASK_LABEL;
  }

  private decay(): void {
    for (const [task, c] of this.counts) {
      const half = Math.floor(c / 2);
      if (half === 0 && !this.holders.has(task)) this.counts.delete(task);
      else this.counts.set(task, half);
    }
  }
}

export interface MetricsOptions {
  /** N of "the N busiest tasks keep their label". */
  maxTaskLabels?: number;
  /** Reported in `deltaserve_lora_requests_info` until the scheduler says otherwise. */
  maxLoras?: number;
  /** Process metrics (CPU, memory, event loop lag); off in tests that count series. */
  defaultMetrics?: boolean;
}

const SECONDS_REQUEST = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300];
const SECONDS_TTFT = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];
const SECONDS_TPOT = [0.002, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5];
const ROWS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256];
const SECONDS_LOAD = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

export class Metrics {
  readonly registry = new Registry();
  readonly tasks: TaskLabeler;
  /** Status values seen per task, so a displaced task's request series can all be removed. */
  private readonly statusesSeen = new Map<string, Set<string>>();

  private readonly waiting = this.gauge('deltaserve_num_requests_waiting', 'Requests queued, not yet in the running batch.');
  private readonly running = this.gauge('deltaserve_num_requests_running', 'Requests in the running batch.');
  private readonly kvUsage = this.gauge('deltaserve_kv_cache_usage_perc', 'Fraction of the KV cache in use, 0..1.');
  private readonly loraInfo = new Gauge({
    name: 'deltaserve_lora_requests_info',
    help: 'Value: unix time of the last update. Labels: max_lora and the comma-separated ids of deltas running and waiting.',
    labelNames: ['max_lora', 'running_lora_adapters', 'waiting_lora_adapters'] as const,
    registers: [this.registry],
  });
  private readonly requestDuration = new Histogram({
    name: 'deltaserve_request_duration_seconds',
    help: 'Generation request time from arrival to the last byte, by task and HTTP status.',
    labelNames: ['task', 'status'] as const,
    buckets: SECONDS_REQUEST,
    registers: [this.registry],
  });
  private readonly ttft = this.taskHistogram('deltaserve_time_to_first_token_seconds', 'Time from arrival to the first generated token.', SECONDS_TTFT);
  private readonly tpot = this.taskHistogram('deltaserve_time_per_output_token_seconds', 'Mean time per generated token after the first.', SECONDS_TPOT);
  private readonly promptTokens = this.taskCounter('deltaserve_prompt_tokens_total', 'Prompt tokens processed.');
  private readonly generatedTokens = this.taskCounter('deltaserve_generated_tokens_total', 'Tokens generated.');
  private readonly batchSize = new Histogram({
    name: 'deltaserve_batch_size',
    help: 'Rows per engine step.',
    buckets: ROWS,
    registers: [this.registry],
  });
  private readonly cacheHits = this.counter('deltaserve_delta_cache_hits_total', 'Delta cache hits.');
  private readonly cacheMisses = this.counter('deltaserve_delta_cache_misses_total', 'Delta cache misses (the delta was loaded from the store).');
  private readonly cacheEvictions = this.counter('deltaserve_delta_cache_evictions_total', 'Deltas evicted from the cache.');
  private readonly cacheBytes = this.gauge('deltaserve_delta_cache_bytes', 'Bytes held by the delta cache.');
  private readonly deltaLoad = new Histogram({
    name: 'deltaserve_delta_load_seconds',
    help: 'Time to load and validate a delta on a cache miss.',
    buckets: SECONDS_LOAD,
    registers: [this.registry],
  });
  private readonly deltasRegistered = this.gauge('deltaserve_deltas_registered', 'Deltas in the store.');
  private readonly draining = this.gauge('deltaserve_draining', '1 while the server drains after SIGTERM (refusing new work), else 0.');
  // Beyond the contract: what each engine step costs, and what would cross a GPU's bus.
  private readonly engineStep = new Histogram({
    name: 'deltaserve_engine_step_seconds',
    help: 'Time of one engine run, by phase (prefill chunk or decode).',
    labelNames: ['phase'] as const,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
    registers: [this.registry],
  });
  private readonly transferBytes = new Counter({
    name: 'deltaserve_engine_transfer_bytes_total',
    help: 'Bytes that really crossed between host and device (0 on the CPU provider; every feed and output on host-fed CUDA; ids, lengths, argmax and changed banks on WebGPU).',
    labelNames: ['direction'] as const,
    registers: [this.registry],
  });
  private readonly engineFailures = new Counter({
    name: 'deltaserve_engine_failures_total',
    help: 'Engine session runs that failed, by phase (prefix, prefill, decode; step: a failure outside any run, which fails every row held). Each fails exactly its rows with a 500 engine_error.',
    labelNames: ['phase'] as const,
    registers: [this.registry],
  });
  private readonly engineFailedRequests = this.counter('deltaserve_engine_failed_requests_total',
    'Requests answered 500 engine_error because an engine run that held them failed.');
  private readonly kvBytes = this.gauge('deltaserve_kv_cache_bytes', 'Bytes of KV cache buffers the engine holds.');
  private readonly bankBytes = this.gauge('deltaserve_delta_bank_bytes', 'Bytes held by the engine\'s delta banks.');
  private readonly bankBudget = this.gauge('deltaserve_delta_bank_budget_bytes',
    'The delta banks\' budget (DELTASERVE_BANK_BYTES): a request waits while its rows\' banks would pass it.');

  constructor(opts: MetricsOptions = {}) {
    this.tasks = new TaskLabeler(opts.maxTaskLabels ?? 20, (task) => this.forget(task));
    if (opts.defaultMetrics ?? true) collectDefaultMetrics({ register: this.registry });
    this.setLoraInfo(opts.maxLoras ?? 32, [], []);
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  render(): Promise<string> {
    return this.registry.metrics();
  }

  // --- scheduler -----------------------------------------------------------

  setQueue(waiting: number, running: number): void {
    this.waiting.set(waiting);
    this.running.set(running);
  }

  setKvUsage(fraction: number): void {
    this.kvUsage.set(Math.min(1, Math.max(0, fraction)));
  }

  /**
   * One series only: the gauge is reset before each update, so a scraper reads
   * the current sets rather than picking the newest of many stale series.
   */
  setLoraInfo(maxLora: number, running: Iterable<string>, waiting: Iterable<string>): void {
    this.loraInfo.reset();
    this.loraInfo.set(
      {
        max_lora: String(maxLora),
        running_lora_adapters: [...new Set(running)].join(','),
        waiting_lora_adapters: [...new Set(waiting)].join(','),
      },
      Date.now() / 1000,
    );
  }

  observeBatch(rows: number): void {
    this.batchSize.observe(rows);
  }

  observeEngineStep(stats: {
    prefillMs: number; decodeMs: number; prefillRows: number; decodeRows: number; transfer: { toDevice: number; toHost: number }; kvBytes: number; bankBytes: number;
    failures?: { phase: string; rows: number }[];
  }): void {
    for (const f of stats.failures ?? []) this.engineFailure(f.phase, f.rows);
    if (stats.prefillRows) this.engineStep.observe({ phase: 'prefill' }, stats.prefillMs / 1000);
    if (stats.decodeRows) this.engineStep.observe({ phase: 'decode' }, stats.decodeMs / 1000);
    this.transferBytes.inc({ direction: 'to_device' }, stats.transfer.toDevice);
    this.transferBytes.inc({ direction: 'to_host' }, stats.transfer.toHost);
    this.kvBytes.set(stats.kvBytes);
    this.bankBytes.set(stats.bankBytes);
  }

  /** An engine run (or, `step`, a whole step) failed, taking `rows` requests with it. */
  engineFailure(phase: string, rows: number): void {
    this.engineFailures.inc({ phase });
    this.engineFailedRequests.inc(rows);
  }

  setBankBudget(bytes: number): void {
    this.bankBudget.set(bytes);
  }

  // --- HTTP layer ----------------------------------------------------------

  /** Counts the request toward the busiest-task ranking; call once per request. */
  observeRequest(task: string | null, status: number | string, seconds: number): void {
    const label = this.tasks.label(task);
    const s = String(status);
    let seen = this.statusesSeen.get(label);
    if (!seen) this.statusesSeen.set(label, (seen = new Set()));
    seen.add(s);
    this.requestDuration.observe({ task: label, status: s }, seconds);
  }

  observeTtft(task: string | null, seconds: number): void {
    this.ttft.observe({ task: this.tasks.peek(task) }, seconds);
  }

  observeTpot(task: string | null, seconds: number): void {
    this.tpot.observe({ task: this.tasks.peek(task) }, seconds);
  }

  addTokens(task: string | null, prompt: number, generated: number): void {
    const label = this.tasks.peek(task);
    if (prompt > 0) this.promptTokens.inc({ task: label }, prompt);
    if (generated > 0) this.generatedTokens.inc({ task: label }, generated);
  }

  // --- delta cache and store ------------------------------------------------

  cacheHit(): void {
    this.cacheHits.inc();
  }

  cacheMiss(): void {
    this.cacheMisses.inc();
  }

  cacheEvict(count = 1): void {
    this.cacheEvictions.inc(count);
  }

  setCacheBytes(bytes: number): void {
    this.cacheBytes.set(bytes);
  }

  observeDeltaLoad(seconds: number): void {
    this.deltaLoad.observe(seconds);
  }

  setDeltasRegistered(count: number): void {
    this.deltasRegistered.set(count);
  }

  setDraining(draining: boolean): void {
    this.draining.set(draining ? 1 : 0);
  }

  // -------------------------------------------------------------------------

  private forget(task: string): void {
    for (const status of this.statusesSeen.get(task) ?? []) this.requestDuration.remove({ task, status });
    this.statusesSeen.delete(task);
    for (const m of [this.ttft, this.tpot]) m.remove({ task });
    for (const m of [this.promptTokens, this.generatedTokens]) m.remove({ task });
  }

  private gauge(name: string, help: string): Gauge {
    return new Gauge({ name, help, registers: [this.registry] });
  }

  private counter(name: string, help: string): Counter {
    return new Counter({ name, help, registers: [this.registry] });
  }

  private taskCounter(name: string, help: string): Counter<'task'> {
    return new Counter({ name, help, labelNames: ['task'] as const, registers: [this.registry] });
  }

  private taskHistogram(name: string, help: string, buckets: number[]): Histogram<'task'> {
    return new Histogram({ name, help, labelNames: ['task'] as const, buckets, registers: [this.registry] });
  }
}
