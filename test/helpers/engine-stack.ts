/**
 * The full real stack for engine tests: startServices (real registry on disk,
 * real ORT session in a real worker thread, real scheduler, real HTTP app),
 * plus delta builders for every kind and a recorder of the engine's own step
 * results. Nothing here is a fake.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BackboneInfo, LinearModule } from '../../src/backbone/types.js';
import { loadConfig } from '../../src/config.js';
import { encodeSafetensors, type TensorToWrite } from '../../src/deltas/safetensors.js';
import type { DeltaRecord } from '../../src/deltas/types.js';
import type { StepResult } from '../../src/engine/protocol.js';
import type { GenerationResult, SamplingParams } from '../../src/engine/types.js';
import { createLogger } from '../../src/log.js';
import { startServices, type Services } from '../../src/server.js';
import { randomFloats, writeDelta } from './deltas.js';

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

export type TaskSpec =
  | { id: string; kind: 'peft-lora'; rank: number; targets: string[]; seed: number }
  | { id: string; kind: 'opendelta-lora'; rank: number; targets: string[]; seed: number }
  | { id: string; kind: 'adapter'; bottleneck: number; activation: string; targets: string[]; seed: number }
  | { id: string; kind: 'bitfit'; targets: string[]; seed: number };

const endsWith = (name: string, suffix: string) => name === suffix || name.endsWith(`.${suffix}`);
const modulesFor = (info: BackboneInfo, targets: string[]): LinearModule[] => {
  const mods = info.modules.filter((m) => targets.some((t) => endsWith(m.name, t)));
  if (!mods.length) throw new Error(`no module of ${info.name} matches ${targets.join(', ')}`);
  return mods;
};
const f32 = (shape: number[], data: Float32Array) => ({ dtype: 'F32' as const, shape, data });

/** The files of one delta: strong enough that its task's greedy output differs from the bare backbone's. */
export function deltaFiles(info: BackboneInfo, spec: TaskSpec): Record<string, unknown> {
  const mods = modulesFor(info, spec.targets);
  let seed = spec.seed * 1000;
  const rand = (n: number, scale: number) => randomFloats(n, seed++, scale);
  const tensors: Record<string, ReturnType<typeof f32>> = {};
  switch (spec.kind) {
    case 'peft-lora': {
      const r = spec.rank;
      for (const m of mods) {
        tensors[`base_model.model.${m.name}.lora_A.weight`] = f32([r, m.inFeatures], rand(r * m.inFeatures, 1 / Math.sqrt(m.inFeatures)));
        tensors[`base_model.model.${m.name}.lora_B.weight`] = f32([m.outFeatures, r], rand(m.outFeatures * r, 0.5));
      }
      const config = {
        peft_type: 'LORA', task_type: 'CAUSAL_LM', r, lora_alpha: 2 * r, target_modules: spec.targets,
        bias: 'none', fan_in_fan_out: info.family === 'gpt2',
      };
      return { 'adapter_config.json': config, 'adapter_model.safetensors': tensors };
    }
    case 'opendelta-lora': {
      const r = spec.rank;
      for (const m of mods) {
        tensors[`${m.name}.lora.lora_A`] = f32([r, m.inFeatures], rand(r * m.inFeatures, 1 / Math.sqrt(m.inFeatures)));
        tensors[`${m.name}.lora.lora_B`] = f32([m.outFeatures, r], rand(m.outFeatures * r, 0.5));
      }
      return { 'config.json': { delta_type: 'lora', modified_modules: spec.targets, lora_r: r, lora_alpha: 2 * r }, 'model.safetensors': tensors };
    }
    case 'adapter': {
      const n = spec.bottleneck;
      for (const m of mods) {
        const p = `${m.name}.adapter.modulelist`;
        const d = m.outFeatures;
        tensors[`${p}.down_proj.weight`] = f32([n, d], rand(n * d, 2 / Math.sqrt(d)));
        tensors[`${p}.down_proj.bias`] = f32([n], rand(n, 0.2));
        tensors[`${p}.up_proj.weight`] = f32([d, n], rand(d * n, 3 / Math.sqrt(n)));
        tensors[`${p}.up_proj.bias`] = f32([d], rand(d, 0.5));
      }
      return {
        'config.json': { delta_type: 'adapter', modified_modules: spec.targets, bottleneck_dim: n, non_linearity: spec.activation },
        'model.safetensors': tensors,
      };
    }
    case 'bitfit': {
      for (const m of mods) {
        const tuned = rand(m.outFeatures, 1.5);
        const own = info.biasOf(m.name);
        if (own) for (let i = 0; i < tuned.length; i++) tuned[i] += own[i];
        tensors[`${m.name}.bias`] = f32([m.outFeatures], tuned);
      }
      return { 'config.json': { delta_type: 'bitfit', modified_modules: spec.targets }, 'model.safetensors': tensors };
    }
  }
}

/** Writes a delta's files into the stack's scratch folder and registers them. */
export async function registerDelta(stack: Stack, spec: TaskSpec, opts: { id?: string; replace?: boolean } = {}): Promise<DeltaRecord> {
  const id = opts.id ?? spec.id;
  const dir = await mkdtemp(join(stack.scratch, `upload-${id}-`));
  const files = await writeDelta(dir, encodeTensors(deltaFiles(stack.services.backbone.info, spec)));
  return stack.services.registry.register(id, files, { replace: opts.replace ?? false });
}

/** Files as bytes/strings, with tensor maps encoded as safetensors. */
export function encodeTensors(files: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [name, content] of Object.entries(files)) {
    out[name] = name.endsWith('.safetensors') ? encodeSafetensorsAny(content) : content;
  }
  return out;
}

const encodeSafetensorsAny = (t: unknown) => encodeSafetensors(t as Record<string, TensorToWrite>);

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
