/**
 * A delta of every kind, as its format saves it (config + safetensors
 * tensors, PEFT's or OpenDelta's names), and for each an independent
 * reference: hooks that build the delta into a demo model, its weights merged
 * (LoRA, IA³ on inputs) or its ops written out here (adapters, BitFit, IA³ on
 * outputs), computed from the files' own tensors by this file's code, never
 * by src/deltas. Deltas are strong enough that each task's greedy output
 * differs from the bare backbone's.
 */
import type { BuildHooks } from '../../src/backbone/demo/layers.js';
import type { GraphBuilder } from '../../src/backbone/onnx/graph-builder.js';
import type { BackboneInfo, LinearModule } from '../../src/backbone/types.js';
import { encodeSafetensors, type TensorToWrite } from '../../src/deltas/safetensors.js';
import { randomFloats } from './deltas.js';

export type Activation = 'relu' | 'gelu' | 'gelu_new' | 'silu';

export type TaskSpec =
  | { id: string; kind: 'peft-lora'; rank: number; targets: string[]; seed: number }
  | { id: string; kind: 'opendelta-lora'; rank: number; targets: string[]; seed: number }
  | { id: string; kind: 'adapter'; bottleneck: number; activation: Activation; targets: string[]; seed: number }
  | { id: string; kind: 'bitfit'; targets: string[]; seed: number }
  /** `feedforward`: suffixes of the targets whose input IA³ scales. */
  | { id: string; kind: 'ia3'; targets: string[]; feedforward: string[]; seed: number }
  | {
    id: string; kind: 'compacter'; reductionFactor: number; n: number; factorizedPhm: boolean; factorizedRule: boolean;
    /** phm_rank: the rank of each W = W_left·W_right (1 when absent). */
    phmRank?: number;
    activation: Activation; targets: string[]; seed: number;
  }
  | { id: string; kind: 'low_rank_adapter'; reductionFactor: number; activation: Activation; targets: string[]; seed: number }
  | { id: string; kind: 'parallel_adapter'; bottleneck: number; scaled: number; activation: Activation; targets: string[]; seed: number };

export type Tensors = Record<string, TensorToWrite>;

/** A delta's files: the config object and the tensors of its .safetensors, keyed by file name. */
export interface DeltaFiles {
  [name: string]: Record<string, unknown> | Tensors;
}

const endsWith = (name: string, suffix: string) => name === suffix || name.endsWith(`.${suffix}`);
export const modulesFor = (info: BackboneInfo, targets: string[]): LinearModule[] => {
  const mods = info.modules.filter((m) => targets.some((t) => endsWith(m.name, t)));
  if (!mods.length) throw new Error(`no module of ${info.name} matches ${targets.join(', ')}`);
  return mods;
};
const f32 = (shape: number[], data: Float32Array): TensorToWrite => ({ dtype: 'F32', shape, data });

/** The files of one delta, as PEFT or OpenDelta would save it. */
export function deltaFiles(info: BackboneInfo, spec: TaskSpec): DeltaFiles {
  const mods = modulesFor(info, spec.targets);
  let seed = spec.seed * 1000;
  const rand = (n: number, scale: number) => randomFloats(n, seed++, scale);
  const t: Tensors = {};
  const openDelta = (config: Record<string, unknown>) => ({
    'config.json': { modified_modules: spec.targets, ...config }, 'model.safetensors': t,
  });
  switch (spec.kind) {
    case 'peft-lora': {
      const r = spec.rank;
      for (const m of mods) {
        t[`base_model.model.${m.name}.lora_A.weight`] = f32([r, m.inFeatures], rand(r * m.inFeatures, 1 / Math.sqrt(m.inFeatures)));
        t[`base_model.model.${m.name}.lora_B.weight`] = f32([m.outFeatures, r], rand(m.outFeatures * r, 0.5));
      }
      const config = {
        peft_type: 'LORA', task_type: 'CAUSAL_LM', r, lora_alpha: 2 * r, target_modules: spec.targets,
        bias: 'none', fan_in_fan_out: info.family === 'gpt2',
      };
      return { 'adapter_config.json': config, 'adapter_model.safetensors': t };
    }
    case 'opendelta-lora': {
      const r = spec.rank;
      for (const m of mods) {
        t[`${m.name}.lora.lora_A`] = f32([r, m.inFeatures], rand(r * m.inFeatures, 1 / Math.sqrt(m.inFeatures)));
        t[`${m.name}.lora.lora_B`] = f32([m.outFeatures, r], rand(m.outFeatures * r, 0.5));
      }
      return openDelta({ delta_type: 'lora', lora_r: r, lora_alpha: 2 * r });
    }
    case 'adapter':
    case 'parallel_adapter': {
      const n = spec.bottleneck;
      for (const m of mods) {
        const p = `${m.name}.${spec.kind}.modulelist`;
        const d = spec.kind === 'adapter' ? m.outFeatures : m.inFeatures;
        t[`${p}.down_proj.weight`] = f32([n, d], rand(n * d, 2 / Math.sqrt(d)));
        t[`${p}.down_proj.bias`] = f32([n], rand(n, 0.2));
        t[`${p}.up_proj.weight`] = f32([m.outFeatures, n], rand(m.outFeatures * n, 3 / Math.sqrt(n)));
        t[`${p}.up_proj.bias`] = f32([m.outFeatures], rand(m.outFeatures, 0.5));
      }
      const extra = spec.kind === 'parallel_adapter' ? { scaled: spec.scaled } : {};
      return openDelta({ delta_type: spec.kind, bottleneck_dim: n, non_linearity: spec.activation, ...extra });
    }
    case 'bitfit': {
      for (const m of mods) {
        // OpenDelta saves the tuned bias itself: the backbone's own plus what training moved.
        const tuned = rand(m.outFeatures, 1.5);
        const own = info.biasOf(m.name);
        if (own) for (let i = 0; i < tuned.length; i++) tuned[i] += own[i];
        t[`${m.name}.bias`] = f32([m.outFeatures], tuned);
      }
      return openDelta({ delta_type: 'bitfit' });
    }
    case 'ia3': {
      for (const m of mods) {
        const ff = spec.feedforward.some((s) => endsWith(m.name, s));
        const l = rand(ff ? m.inFeatures : m.outFeatures, 0.8).map((x) => 1 + x);
        t[`base_model.model.${m.name}.ia3_l`] = f32(ff ? [1, m.inFeatures] : [m.outFeatures, 1], l);
      }
      const config = {
        peft_type: 'IA3', task_type: 'CAUSAL_LM', target_modules: spec.targets, feedforward_modules: spec.feedforward,
        fan_in_fan_out: info.family === 'gpt2', init_ia3_weights: true,
      };
      return { 'adapter_config.json': config, 'adapter_model.safetensors': t };
    }
    case 'compacter': {
      const [n, r] = [spec.n, spec.phmRank ?? 1];
      for (const m of mods) {
        const hidden = m.outFeatures;
        const bn = Math.floor(hidden / spec.reductionFactor);
        for (const [sampler, inF, outF, gain] of [['down_sampler', hidden, bn, 3], ['up_sampler', bn, hidden, 4.4]] as const) {
          const p = `${m.name}.compactor.${sampler}`;
          if (spec.factorizedRule) {
            t[`${p}.phm_rule_left`] = f32([n, n, 1], rand(n * n, 1));
            t[`${p}.phm_rule_right`] = f32([n, 1, n], rand(n * n, 1));
          } else {
            t[`${p}.phm_rule`] = f32([n, n, n], rand(n * n * n, 1));
          }
          const [ki, ko] = [inF / n, outF / n];
          if (spec.factorizedPhm) {
            t[`${p}.W_left`] = f32([n, ki, r], rand(n * ki * r, 1));
            t[`${p}.W_right`] = f32([n, r, ko], rand(n * r * ko, gain / Math.sqrt(inF * r)));
          } else {
            t[`${p}.W`] = f32([n, ki, ko], rand(n * ki * ko, gain / Math.sqrt(inF)));
          }
          t[`${p}.b`] = f32([outF], rand(outF, sampler === 'down_sampler' ? 0.2 : 0.5));
        }
      }
      return openDelta({
        delta_type: 'compacter', reduction_factor: spec.reductionFactor, hypercomplex_division: n, non_linearity: spec.activation,
        factorized_phm: spec.factorizedPhm, factorized_phm_rule: spec.factorizedRule, phm_rank: r,
        use_bias_down_sampler: true, use_bias_up_sampler: true, shared_phm_rule: false, shared_W_phm: false,
      });
    }
    case 'low_rank_adapter': {
      for (const m of mods) {
        const hidden = m.outFeatures;
        const bn = Math.floor(hidden / spec.reductionFactor);
        for (const [sampler, inF, outF, gain] of [['down_sampler', hidden, bn, 6], ['up_sampler', bn, hidden, 5]] as const) {
          const p = `${m.name}.low_rank_adapter.${sampler}`;
          t[`${p}.W_left`] = f32([inF, 1], rand(inF, 1));
          t[`${p}.W_right`] = f32([1, outF], rand(outF, gain / Math.sqrt(inF)));
          t[`${p}.b`] = f32([outF], rand(outF, sampler === 'down_sampler' ? 0.2 : 0.5));
        }
      }
      return openDelta({ delta_type: 'low_rank_adapter', reduction_factor: spec.reductionFactor, non_linearity: spec.activation, low_rank_rank: 1 });
    }
  }
}

/** Files as bytes/strings, with tensor maps encoded as safetensors. */
export function encodeTensors(files: DeltaFiles): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [name, content] of Object.entries(files)) out[name] = name.endsWith('.safetensors') ? encodeSafetensors(content as Tensors) : content;
  return out;
}

// ---------------------------------------------------------------- the references

/** Activations written out here, independently of src/backbone/onnx/activations.ts. */
function activation(g: GraphBuilder, kind: Activation, x: string): string {
  switch (kind) {
    case 'relu':
      return g.op('Relu', [x]);
    case 'silu':
      return g.op('Mul', [x, g.op('Sigmoid', [x])]);
    case 'gelu': // 0.5·x·(1 + erf(x/√2))
      return g.op('Mul', [g.op('Mul', [x, g.scalar(0.5)]), g.op('Add', [g.op('Erf', [g.op('Mul', [x, g.scalar(Math.SQRT1_2)])]), g.scalar(1)])]);
    case 'gelu_new': { // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
      const x3 = g.op('Mul', [x, g.op('Mul', [x, x])]);
      const inner = g.op('Mul', [g.op('Add', [x, g.op('Mul', [x3, g.scalar(0.044715)])]), g.scalar(Math.sqrt(2 / Math.PI))]);
      return g.op('Mul', [g.op('Mul', [x, g.scalar(0.5)]), g.op('Add', [g.op('Tanh', [inner]), g.scalar(1)])]);
    }
  }
}

/** nn.Linear's weight [out, in] as the [in, out] matrix x·W multiplies by. */
function linearT(w: Float32Array, out: number, inF: number): Float32Array {
  const t = new Float32Array(inF * out);
  for (let o = 0; o < out; o++) for (let i = 0; i < inF; i++) t[i * out + o] = w[o * inF + i];
  return t;
}

/** The Kronecker product a ⊗ b of [p, q] and [r, s] matrices, [p·r, q·s]. */
export function kron(a: ArrayLike<number>, p: number, q: number, b: ArrayLike<number>, r: number, s: number): Float64Array {
  const out = new Float64Array(p * r * q * s);
  for (let i = 0; i < p; i++) {
    for (let j = 0; j < q; j++) {
      for (let k = 0; k < r; k++) for (let l = 0; l < s; l++) out[(i * r + k) * (q * s) + j * s + l] = a[i * q + j] * b[k * s + l];
    }
  }
  return out;
}

/** [n, p, q]·[n, q, s] slice by slice. */
function bmm(a: ArrayLike<number>, b: ArrayLike<number>, n: number, p: number, q: number, s: number): Float64Array {
  const out = new Float64Array(n * p * s);
  for (let i = 0; i < n; i++) {
    for (let r = 0; r < p; r++) {
      for (let c = 0; c < s; c++) {
        let acc = 0;
        for (let k = 0; k < q; k++) acc += a[(i * p + r) * q + k] * b[(i * q + k) * s + c];
        out[(i * p + r) * s + c] = acc;
      }
    }
  }
  return out;
}

/** A PHM layer's weight Σᵢ ruleᵢ ⊗ Wᵢ, [in, out], from the compacter's tensors under `prefix`. */
export function phmWeight(t: Tensors, prefix: string, n: number, inF: number, outF: number): Float32Array {
  const get = (name: string) => t[`${prefix}.${name}`]?.data as Float32Array | undefined;
  const rule = get('phm_rule') ?? bmm(get('phm_rule_left')!, get('phm_rule_right')!, n, n, 1, n);
  const [ki, ko] = [inF / n, outF / n];
  const rank = t[`${prefix}.W_left`]?.shape[2] ?? 0;
  const w = get('W') ?? bmm(get('W_left')!, get('W_right')!, n, ki, rank, ko);
  const h = new Float64Array(inF * outF);
  for (let i = 0; i < n; i++) {
    const k = kron(rule.subarray(i * n * n, (i + 1) * n * n), n, n, w.subarray(i * ki * ko, (i + 1) * ki * ko), ki, ko);
    for (let j = 0; j < h.length; j++) h[j] += k[j];
  }
  return Float32Array.from(h);
}

/** A bottleneck written into the reference graph: y + act(src·down + db)·up + ub, weights in x·W order. */
interface RefBottleneck {
  reads: 'output' | 'input';
  activation: Activation;
  down: Float32Array;
  downBias: Float32Array;
  up: Float32Array;
  upBias: Float32Array;
  dims: [number, number, number];
}

/**
 * Hooks that build `spec`'s delta into a demo model, from the tensors of
 * `files` (as deltaFiles wrote them).
 */
export function referenceHooks(info: BackboneInfo, spec: TaskSpec, files: DeltaFiles): BuildHooks {
  const t = Object.entries(files).find(([name]) => name.endsWith('.safetensors'))![1] as Tensors;
  const data = (key: string) => t[key].data as Float32Array;
  const mods = new Map(modulesFor(info, spec.targets).map((m) => [m.name, m]));
  const weight = new Map<string, (w: Float32Array, inF: number, outF: number) => Float32Array>();
  const output = new Map<string, (g: GraphBuilder, y: string, x: string) => string>();
  let k = 0;
  const bottleneck = (module: string, b: RefBottleneck) => output.set(module, (g, y, x) => {
    const n = k++;
    const [src, bn, out] = b.dims;
    const z = g.op('Add', [g.op('MatMul', [b.reads === 'output' ? y : x, g.weight(`ref.${n}.down`, b.down, [src, bn])]), g.weight(`ref.${n}.db`, b.downBias, [bn])]);
    const up = g.op('MatMul', [activation(g, b.activation, z), g.weight(`ref.${n}.up`, b.up, [bn, out])]);
    return g.op('Add', [g.op('Add', [y, up]), g.weight(`ref.${n}.ub`, b.upBias, [out])]);
  });

  for (const [name, m] of mods) {
    const { inFeatures: inF, outFeatures: out } = m;
    switch (spec.kind) {
      case 'peft-lora':
      case 'opendelta-lora': {
        const [A, B] = spec.kind === 'peft-lora'
          ? [data(`base_model.model.${name}.lora_A.weight`), data(`base_model.model.${name}.lora_B.weight`)]
          : [data(`${name}.lora.lora_A`), data(`${name}.lora.lora_B`)];
        const r = spec.rank;
        const scale = (2 * r) / r;
        // W + s·AᵀBᵀ, accumulated in double precision: the reference should be the more exact side.
        weight.set(name, (w) => {
          const merged = Float32Array.from(w);
          for (let i = 0; i < inF; i++) {
            for (let o = 0; o < out; o++) {
              let acc = 0;
              for (let j = 0; j < r; j++) acc += A[j * inF + i] * B[o * r + j];
              merged[i * out + o] = w[i * out + o] + scale * acc;
            }
          }
          return merged;
        });
        break;
      }
      case 'adapter':
      case 'parallel_adapter': {
        const p = `${name}.${spec.kind}.modulelist`;
        const n = spec.bottleneck;
        const src = spec.kind === 'adapter' ? out : inF;
        const s = spec.kind === 'parallel_adapter' ? spec.scaled : 1;
        bottleneck(name, {
          reads: spec.kind === 'adapter' ? 'output' : 'input', activation: spec.activation,
          down: linearT(data(`${p}.down_proj.weight`), n, src), downBias: data(`${p}.down_proj.bias`),
          up: linearT(data(`${p}.up_proj.weight`), out, n).map((v) => v * s), upBias: data(`${p}.up_proj.bias`).map((v) => v * s),
          dims: [src, n, out],
        });
        break;
      }
      case 'bitfit': {
        const own = info.biasOf(name);
        const shift = data(`${name}.bias`).map((v, i) => v - (own?.[i] ?? 0));
        output.set(name, (g, y) => g.op('Add', [y, g.weight(`ref.${k++}.bitfit`, shift, [out])]));
        break;
      }
      case 'ia3': {
        const l = data(`base_model.model.${name}.ia3_l`);
        if (t[`base_model.model.${name}.ia3_l`].shape[0] === 1) {
          // Feed-forward: (x ⊙ l)·W = x·(diag(l)·W), PEFT's merge.
          weight.set(name, (w) => w.map((v, j) => v * l[Math.floor(j / out)]));
        } else {
          output.set(name, (g, y) => g.op('Mul', [y, g.weight(`ref.${k++}.ia3`, l, [out])]));
        }
        break;
      }
      case 'compacter': {
        const bn = Math.floor(out / spec.reductionFactor);
        const p = `${name}.compactor`;
        bottleneck(name, {
          reads: 'output', activation: spec.activation, dims: [out, bn, out],
          down: phmWeight(t, `${p}.down_sampler`, spec.n, out, bn), downBias: data(`${p}.down_sampler.b`),
          up: phmWeight(t, `${p}.up_sampler`, spec.n, bn, out), upBias: data(`${p}.up_sampler.b`),
        });
        break;
      }
      case 'low_rank_adapter': {
        const bn = Math.floor(out / spec.reductionFactor);
        const p = `${name}.low_rank_adapter`;
        const outer = (sampler: string, a: number, b: number) => {
          const left = data(`${p}.${sampler}.W_left`);
          const right = data(`${p}.${sampler}.W_right`);
          return Float32Array.from({ length: a * b }, (_, j) => left[Math.floor(j / b)] * right[j % b]);
        };
        bottleneck(name, {
          reads: 'output', activation: spec.activation, dims: [out, bn, out],
          down: outer('down_sampler', out, bn), downBias: data(`${p}.down_sampler.b`),
          up: outer('up_sampler', bn, out), upBias: data(`${p}.up_sampler.b`),
        });
        break;
      }
    }
  }
  return {
    linearWeight: (module, w, inF, outF) => weight.get(module)?.(w, inF, outF) ?? w,
    linearOutput: (g, module, y, _outF, x) => output.get(module)?.(g, y, x) ?? y,
  };
}
