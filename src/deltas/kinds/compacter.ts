/**
 * Compacter (OpenDelta `compacter`, Mahabadi et al. 2021): a bottleneck
 * adapter on a module's output whose down- and up-projections are PHM layers,
 * a weight built as a sum of Kronecker products,
 *
 *   H = Σᵢ ruleᵢ ⊗ Wᵢ    ruleᵢ: [n, n], Wᵢ: [in/n, out/n] (= W_leftᵢ·W_rightᵢ when factorized_phm)
 *   y = x·H + b          (OpenDelta's PHMLinear: kronecker_product_einsum_batched, summed over i)
 *
 * with n = hypercomplex_division and the bottleneck hidden / reduction_factor.
 * Served as the adapter it computes: H is multiplied out at registration.
 * Kept factored it would be cheaper (bench section "kinds": the branch on 24
 * modules at batch 32 takes 0.49× the multiplied-out time, ~9 % of the step,
 * and a row's banks 3 % of the bytes), but by the mixed-product rule
 * ruleᵢ ⊗ (LᵢRᵢ) = (ruleᵢ ⊗ Lᵢ)(Iₙ ⊗ Rᵢ) each PHM layer is a product of rank
 * n²·phm_rank, so a factored site needs two padded axes per row (that rank
 * and the bottleneck), which the banks' one rank per site cannot hold; the
 * README's known limitations say so.
 *
 * OpenDelta names it `<module>.compactor.{down_sampler,up_sampler}.{phm_rule |
 * phm_rule_left, phm_rule_right, W | W_left, W_right, b}`.
 */
import { z } from 'zod';
import type { Tensor } from '../candidate.js';
import { OPENDELTA_CONFIG } from '../formats/files.js';
import { activationOf, adapterSite, bottleneckRows, type Activation } from './adapter.js';
import { readSchema } from '../problems.js';
import { defineKind, expectShape, needParts, type BuildContext } from './kind.js';

// OpenDelta's CompacterConfig defaults (its config saves every field of its own, so they rarely apply).
const Settings = z.looseObject({
  reduction_factor: z.number().int().positive().default(16),
  non_linearity: z.string().default('relu'),
  hypercomplex_division: z.number().int().positive().default(4),
  factorized_phm: z.boolean().default(true),
  factorized_phm_rule: z.boolean().default(false),
  phm_rank: z.number().int().positive().default(1),
  shared_phm_rule: z.boolean().default(false),
  shared_W_phm: z.boolean().default(false),
  use_bias_up_sampler: z.boolean().default(true),
  use_bias_down_sampler: z.boolean().default(true),
});
type CompacterConfig = z.infer<typeof Settings>;
type CompacterSettings = CompacterConfig & { activation: Activation };

/** The parameter names one PHM layer has under these settings. */
function phmParts(cfg: CompacterConfig, bias: boolean): string[] {
  return [
    ...(cfg.factorized_phm_rule ? ['phm_rule_left', 'phm_rule_right'] : ['phm_rule']),
    ...(cfg.factorized_phm ? ['W_left', 'W_right'] : ['W']),
    ...(bias ? ['b'] : []),
  ];
}

/** Batched [n, p, q]·[n, q, s] → [n, p, s]. */
function bmm(a: Float32Array, b: Float32Array, n: number, p: number, q: number, s: number): Float32Array {
  const out = new Float32Array(n * p * s);
  for (let i = 0; i < n; i++) {
    for (let r = 0; r < p; r++) {
      for (let k = 0; k < q; k++) {
        const x = a[(i * p + r) * q + k];
        for (let c = 0; c < s; c++) out[(i * p + r) * s + c] += x * b[(i * q + k) * s + c];
      }
    }
  }
  return out;
}

/** H = Σᵢ ruleᵢ ⊗ Wᵢ: H[a·(in/n) + k, c·(out/n) + p] = Σᵢ rule[i, a, c] · W[i, k, p]. */
function phmWeight(rule: Float32Array, w: Float32Array, n: number, inF: number, outF: number): Float32Array {
  const [ki, ko] = [inF / n, outF / n];
  const h = new Float32Array(inF * outF);
  for (let i = 0; i < n; i++) {
    for (let a = 0; a < n; a++) {
      for (let c = 0; c < n; c++) {
        const r = rule[(i * n + a) * n + c];
        if (r === 0) continue;
        for (let k = 0; k < ki; k++) {
          const row = (a * ki + k) * outF + c * ko;
          const src = (i * ki + k) * ko;
          for (let p = 0; p < ko; p++) h[row + p] += r * w[src + p];
        }
      }
    }
  }
  return h;
}

/** One PHM layer's weight [inF, outF] and bias, or null after reporting every problem. */
function phmLayer(
  parts: ReadonlyMap<string, Tensor>, at: BuildContext<CompacterSettings>, sampler: string, inF: number, outF: number, bias: boolean,
): { weight: Float32Array; bias: Float32Array | null } | null {
  const cfg = at.settings;
  const n = cfg.hypercomplex_division;
  const want = phmParts(cfg, bias);
  if (!needParts(parts, want.map((p) => `${sampler}.${p}`), at)) return null;
  const t = (p: string) => parts.get(`${sampler}.${p}`);
  if (inF % n || outF % n) {
    at.problems.invalid(`module '${at.module.name}': its ${sampler} maps ${inF} to ${outF} features, which hypercomplex_division ${n} does not divide`);
    return null;
  }
  const [ki, ko, r] = [inF / n, outF / n, cfg.phm_rank];
  const shapes: Record<string, number[]> = {
    phm_rule: [n, n, n], phm_rule_left: [n, n, 1], phm_rule_right: [n, 1, n],
    W: [n, ki, ko], W_left: [n, ki, r], W_right: [n, r, ko], b: [outF],
  };
  const ok = want.map((p) => expectShape(at, `${sampler}.${p}`, t(p)!, shapes[p]));
  if (!ok.every(Boolean)) return null;
  const rule = cfg.factorized_phm_rule ? bmm(t('phm_rule_left')!.data, t('phm_rule_right')!.data, n, n, 1, n) : t('phm_rule')!.data;
  const w = cfg.factorized_phm ? bmm(t('W_left')!.data, t('W_right')!.data, n, ki, r, ko) : t('W')!.data;
  return { weight: phmWeight(rule, w, n, inF, outF), bias: bias ? t('b')!.data.slice() : null };
}

export const compacter = defineKind<CompacterSettings>({
  type: 'compacter',
  site: adapterSite,
  opendelta: {
    name: 'compacter',
    settings(config, problems) {
      const cfg = readSchema(Settings, config, OPENDELTA_CONFIG, problems);
      if (!cfg) return null;
      for (const shared of ['shared_phm_rule', 'shared_W_phm'] as const) {
        if (cfg[shared]) problems.unsupported(`${shared} is true, which OpenDelta's own CompacterModel refuses; save the compacter with ${shared}=False`);
      }
      return { ...cfg, activation: activationOf(cfg.non_linearity, problems) };
    },
    key(name) {
      const m = /^(.+)\.compactor\.(down_sampler|up_sampler)\.(phm_rule|phm_rule_left|phm_rule_right|W|W_left|W_right|b)$/.exec(name);
      return m ? { module: m[1], part: `${m[2]}.${m[3]}` } : null;
    },
    expected: '<module>.compactor.down_sampler/up_sampler .phm_rule, .W_left, .W_right, .b (or their unfactorized forms)',
  },
  build(parts, at) {
    const cfg = at.settings;
    const want = new Set([
      ...phmParts(cfg, cfg.use_bias_down_sampler).map((p) => `down_sampler.${p}`),
      ...phmParts(cfg, cfg.use_bias_up_sampler).map((p) => `up_sampler.${p}`),
    ]);
    for (const [part, t] of parts) {
      if (!want.has(part)) {
        at.problems.invalid(`tensor '${t.name}' does not belong to a compacter with factorized_phm=${cfg.factorized_phm}, factorized_phm_rule=${cfg.factorized_phm_rule} and these use_bias settings`);
      }
    }
    const hidden = at.module.outFeatures;
    const bottleneck = Math.floor(hidden / cfg.reduction_factor);
    if (bottleneck < 1) {
      at.problems.invalid(`module '${at.module.name}': reduction_factor ${cfg.reduction_factor} leaves no bottleneck of its ${hidden} features`);
      return null;
    }
    const down = phmLayer(parts, at, 'down_sampler', hidden, bottleneck, cfg.use_bias_down_sampler);
    const up = phmLayer(parts, at, 'up_sampler', bottleneck, hidden, cfg.use_bias_up_sampler);
    if (!down || !up || parts.size !== want.size) return null;
    return bottleneckRows({
      reads: 'output', bottleneck, activation: cfg.activation,
      down: down.weight, downBias: down.bias, up: up.weight, upBias: up.bias,
    });
  },
});
