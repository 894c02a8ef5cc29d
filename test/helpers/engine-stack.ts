/**
 * The full real stack for engine tests: startServices (real registry on disk,
 * real ORT session in a real worker thread, real scheduler, real HTTP app),
 * registration of deltas of every kind (kind-cases.ts) and a recorder of the
 * engine's own step results. Nothing here is a fake.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BackboneInfo } from '../../src/backbone/types.js';
import { loadConfig } from '../../src/config.js';
import type { DeltaRecord } from '../../src/deltas/types.js';
import type { StepResult } from '../../src/engine/protocol.js';
import type { GenerationResult, SamplingParams } from '../../src/engine/types.js';
import { createLogger } from '../../src/log.js';
import { startServices, type Services } from '../../src/server.js';
import { writeDelta } from './deltas.js';
import { deltaFiles, encodeTensors, type TaskSpec } from './kind-cases.js';

export interface Stack {
  services: Services;
  scratch: string;
  steps: StepRecorder;
  close(): Promise<void>;
}

/** Starts the real services over a fresh delta store; `env` adds DELTASERVE_* settings. */
export async function startStack(model: string, env: Record<string, string> = {}): Promise<Stack> {
  const scratch = await mkdtemp(join(tmpdir(), 'ds-engine-'));
  const config = loadConfig({ DELTASERVE_MODEL: model, DELTASERVE_DELTAS_DIR: join(scratch, 'deltas'), ...env });
  const services = await startServices({ config, logger: createLogger('silent'), cacheDir: join(scratch, 'models'), defaultMetrics: false });
  const steps = new StepRecorder(services);
  return {
    services, scratch, steps,
    close: async () => {
      steps.detach();
      await services.close();
      await rm(scratch, { recursive: true, force: true });
    },
  };
}

export function params(over: Partial<SamplingParams> = {}): SamplingParams {
  return { maxNewTokens: 8, temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: null, stop: [], ...over };
}

export interface Run {
  result: GenerationResult;
  tokens: number[];
}

/** One request through the real scheduler, collecting the streamed token ids. */
export async function generate(
  services: Services, task: string | null, prompt: string, p: SamplingParams,
  extra: { signal?: AbortSignal; deadline?: number; onToken?: (id: number) => void } = {},
): Promise<Run> {
  const tokens: number[] = [];
  const result = await services.scheduler.generate({ task, prompt, params: p, signal: extra.signal, deadline: extra.deadline }, (t) => {
    tokens.push(t.id);
    extra.onToken?.(t.id);
  });
  return { result, tokens };
}

/** Every StepResult the engine worker posts, in order, from the moment it is created. */
export class StepRecorder {
  readonly all: StepResult[] = [];
  private waiters: { pred: (s: StepResult) => boolean; resolve: (s: StepResult) => void }[] = [];
  private readonly listener = (s: StepResult) => this.onStep(s);

  constructor(private readonly services: Services) {
    services.engine.on('step', this.listener);
  }

  private onStep(s: StepResult): void {
    this.all.push(s);
    this.waiters = this.waiters.filter((w) => {
      if (!w.pred(s)) return true;
      w.resolve(s);
      return false;
    });
  }

  /** Resolves with the first step from now on that satisfies `pred`. */
  next(pred: (s: StepResult) => boolean = () => true): Promise<StepResult> {
    return new Promise((resolve) => this.waiters.push({ pred, resolve }));
  }

  mark(): number {
    return this.all.length;
  }

  since(mark: number): StepResult[] {
    return this.all.slice(mark);
  }

  detach(): void {
    this.services.engine.off('step', this.listener);
  }
}

// ---------------------------------------------------------------------------
// Deltas of every kind, written as real files and registered through the real registry.

/** Writes a delta's files into the stack's scratch folder and registers them. */
export async function registerDelta(stack: Stack, spec: TaskSpec, opts: { id?: string; replace?: boolean } = {}): Promise<DeltaRecord> {
  const id = opts.id ?? spec.id;
  const dir = await mkdtemp(join(stack.scratch, `upload-${id}-`));
  const files = await writeDelta(dir, encodeTensors(deltaFiles(stack.services.backbone.info, spec)));
  return stack.services.registry.register(id, files, { replace: opts.replace ?? false });
}

/** Module suffixes per family, for the mixed-task tests. */
const TARGETS = {
  llama: {
    loraSmall: ['q_proj', 'v_proj'],
    loraAll: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
    loraOne: ['mlp.up_proj'],
    adapterMlp: ['mlp.down_proj'],
    adapterAttn: ['self_attn.o_proj'],
    bitfit: ['o_proj', 'down_proj', 'k_proj'],
  },
  gpt2: {
    loraSmall: ['c_attn'],
    loraAll: ['c_attn', 'c_proj', 'c_fc'],
    loraOne: ['mlp.c_fc'],
    adapterMlp: ['mlp.c_proj'],
    adapterAttn: ['attn.c_proj'],
    bitfit: ['c_attn', 'c_fc'],
  },
} as const;

/**
 * Seven deltas of different kinds, formats, ranks and activations; with the
 * bare backbone (task null) they make the eight tasks of the batch tests.
 */
export function mixedTasks(info: BackboneInfo): TaskSpec[] {
  const t = TARGETS[info.family as 'llama' | 'gpt2'];
  if (!t) throw new Error(`no test targets for family ${info.family}`);
  const list = (x: readonly string[]) => [...x];
  return [
    { id: 'lora-r2', kind: 'peft-lora', rank: 2, targets: list(t.loraSmall), seed: 11 },
    { id: 'lora-r8-all', kind: 'peft-lora', rank: 8, targets: list(t.loraAll), seed: 12 },
    { id: 'od-lora-r16', kind: 'opendelta-lora', rank: 16, targets: list(t.loraOne), seed: 13 },
    { id: 'adapter-relu', kind: 'adapter', bottleneck: 8, activation: 'relu', targets: list(t.adapterMlp), seed: 14 },
    { id: 'adapter-gelu', kind: 'adapter', bottleneck: 16, activation: 'gelu', targets: list(t.adapterAttn), seed: 15 },
    { id: 'adapter-silu', kind: 'adapter', bottleneck: 4, activation: 'silu', targets: [...t.adapterMlp, ...t.adapterAttn], seed: 16 },
    { id: 'bitfit', kind: 'bitfit', targets: list(t.bitfit), seed: 17 },
  ];
}

/** A short prompt of `n` printable bytes (the demo tokenizers are byte-level: n tokens plus BOS). */
export function prompt(n: number, salt: number): string {
  const words = ['alpha', 'beta', 'gamma', 'delta', 'eps', 'zeta', 'eta', 'theta', 'iota', 'kappa', 'lambda', 'mu'];
  let s = `${words[salt % words.length]} `;
  for (let i = 0; s.length < n; i++) s += `${words[(salt * 7 + i * 3) % words.length]} `;
  return s.slice(0, n);
}
