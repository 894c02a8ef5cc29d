/**
 * TEST-ONLY stand-ins for the engine and the delta registry, used to test the
 * HTTP layer's own behaviour (framing, status codes, shapes). They run no
 * model: EchoGenerator streams the prompt's characters back, one "token" per
 * character; MemoryRegistry keeps records in memory and remembers the bytes
 * of the files it was given. End-to-end tests with the real engine replace
 * neither's absence of semantics.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import type { BackboneInfo } from '../../src/backbone/types.js';
import type { DeltaFile, DeltaPage, DeltaRecord, DeltaRegistry } from '../../src/deltas/types.js';
import type { GenerateRequest, GenerationResult, Generator, TokenEvent } from '../../src/engine/types.js';
import { ServeError } from '../../src/errors.js';

export const TEST_BACKBONE: BackboneInfo = {
  name: 'test-backbone',
  family: 'llama',
  fingerprint: 'fingerprint-of-test-backbone',
  modules: [
    { name: 'model.layers.0.self_attn.q_proj', kind: 'linear', inFeatures: 16, outFeatures: 16, layer: 0, biasInitializer: null },
    { name: 'model.layers.0.self_attn.v_proj', kind: 'linear', inFeatures: 16, outFeatures: 8, layer: 0, biasInitializer: null },
  ],
  defaultTargets: { lora: ['q_proj', 'v_proj'] },
  hiddenSize: 16,
  numLayers: 1,
  vocabSize: 256,
  maxPositions: 64,
  biasOf: () => null,
};

export interface StoredFile {
  name: string;
  content: Buffer;
}

export class MemoryRegistry implements DeltaRegistry {
  readonly records = new Map<string, DeltaRecord>();
  /** What register() was handed, read from disk at the moment of the call. */
  readonly received = new Map<string, StoredFile[]>();
  cached = new Set<string>();
  registerCalls = 0;

  async register(id: string, files: DeltaFile[], opts: { replace: boolean }): Promise<DeltaRecord> {
    this.registerCalls++;
    if (this.records.has(id) && !opts.replace) {
      throw new ServeError(409, 'delta_exists', `delta "${id}" exists; use ?replace=true`);
    }
    const stored = await Promise.all(files.map(async (f) => ({ name: f.name, content: await readFile(f.path) })));
    const hash = createHash('sha256');
    for (const f of stored) hash.update(f.name).update(f.content);
    const record: DeltaRecord = {
      id,
      type: 'lora',
      format: stored.some((f) => f.name === 'adapter_config.json') ? 'peft' : 'opendelta',
      rank: 8,
      bytes: stored.reduce((n, f) => n + f.content.length, 0),
      sha256: hash.digest('hex'),
      createdAt: new Date().toISOString(),
      sites: [{ module: 'model.layers.0.self_attn.q_proj', kind: 'lora', site: 'lora', shapes: [[16, 8], [8, 16]] }],
      pinned: false,
    };
    this.records.set(id, record);
    this.received.set(id, stored);
    return record;
  }

  async list(): Promise<DeltaRecord[]> {
    return [...this.records.values()];
  }

  async page(opts: { limit: number; after?: string }): Promise<DeltaPage> {
    const all = [...this.records.values()].sort((a, b) => (a.id < b.id ? -1 : 1)).filter((r) => opts.after === undefined || r.id > opts.after);
    return { records: all.slice(0, opts.limit), hasMore: all.length > opts.limit };
  }

  count(): number {
    return this.records.size;
  }

  async setPinned(id: string, pinned: boolean): Promise<DeltaRecord> {
    const r = this.records.get(id);
    if (!r) throw new ServeError(404, 'delta_not_found', `no delta "${id}"`);
    const updated = { ...r, pinned };
    this.records.set(id, updated);
    return updated;
  }

  async get(id: string): Promise<DeltaRecord | null> {
    return this.records.get(id) ?? null;
  }

  async remove(id: string): Promise<void> {
    if (!this.records.delete(id)) throw new ServeError(404, 'delta_not_found', `no delta "${id}"`);
  }

  isCached(id: string): boolean {
    return this.cached.has(id);
  }
}

export interface EchoOptions {
  /** Wait between tokens, to keep a stream open while a test does something else. */
  tokenDelayMs?: number;
  /** Thrown by every generate() call, to test error mapping. */
  fail?: ServeError;
}

/** Made-up logprobs of the right shape: the echoed character at -0.25, then "a", "b", … below it. */
function echoLogprobs(ch: string, n: number): NonNullable<TokenEvent['logprobs']> {
  const top = Array.from({ length: n }, (_, j) => ({ id: 97 + j, text: String.fromCharCode(97 + j), logprob: -1 - j, special: false }));
  return { text: ch, logprob: -0.25, top };
}

/** Streams the prompt back character by character; not a language model. */
export class EchoGenerator implements Generator {
  readonly requests: GenerateRequest[] = [];
  /** Signals of requests that ended because the client aborted them. */
  readonly aborted: GenerateRequest[] = [];

  constructor(
    private readonly registry: MemoryRegistry,
    private readonly opts: EchoOptions = {},
  ) {}

  countTokens(text: string): number {
    return Array.from(text).length;
  }

  async generate(req: GenerateRequest, onToken?: (t: TokenEvent) => void): Promise<GenerationResult> {
    this.requests.push(req);
    if (this.opts.fail) throw this.opts.fail;
    if (req.task !== null && !this.registry.records.has(req.task)) {
      throw new ServeError(404, 'task_not_found', `no task "${req.task}"`);
    }
    const chars = Array.from(req.prompt);
    let text = '';
    let count = 0;
    let finishReason: GenerationResult['finishReason'] = 'eos_token';
    for (const ch of chars) {
      if (count === req.params.maxNewTokens) {
        finishReason = 'length';
        break;
      }
      await new Promise((r) => setTimeout(r, this.opts.tokenDelayMs ?? 0));
      if (req.signal?.aborted) {
        this.aborted.push(req);
        throw new ServeError(499, 'cancelled', 'client went away');
      }
      text += ch;
      count++;
      onToken?.({ id: ch.codePointAt(0)!, text: ch, special: false, ...(req.logprobs === undefined ? {} : { logprobs: echoLogprobs(ch, req.logprobs) }) });
      if (req.params.stop.some((s) => text.endsWith(s))) {
        finishReason = 'stop_sequence';
        break;
      }
    }
    return { task: req.task, generatedText: text, finishReason, generatedTokens: count, promptTokens: chars.length };
  }
}
