/**
 * Compacter (OpenDelta `compacter`, Mahabadi et al. 2021): a bottleneck
 * adapter on a module's output whose down- and up-projections are PHM layers,
 * a weight built as a sum of Kronecker products,
 *
 *   H = Σᵢ ruleᵢ ⊗ Wᵢ    ruleᵢ: [n, n], Wᵢ: [in/n, out/n] (= LᵢRᵢ, rank phm_rank, when factorized_phm)
 *   y = x·H + b          (OpenDelta's PHMLinear: kronecker_product_einsum_batched, summed over i)
 *
 * with n = hypercomplex_division and the bottleneck hidden / reduction_factor.
 *
 * Served factored, through a site of its own, where that is cheaper (bench
 * section "kinds": at batch 32 the factored branch takes half the time of
 * the multiplied-out one and a few percent of the bank bytes). By the
 * mixed-product rule each PHM layer is two products with fixed reshapes
 * between them, either
 *
 *   H = Σᵢ (Iₙ ⊗ Lᵢ)(ruleᵢ ⊗ Rᵢ)   x as [n, in/n] · L' [in/n, (i,j)] → [(a,i,j)] · N [(a,i,j), out]   (down: in ≫ out)
 *   H = Σᵢ (ruleᵢ ⊗ Lᵢ)(Iₙ ⊗ Rᵢ)   x · M [in, (c,i,j)] → [n, (i,j)] · R' [(i,j), out/n]               (up: in ≪ out)
 *
 * so a row's banks hold 2·phm_rank·(hidden + n²·bottleneck) floats instead of
 * 2·hidden·bottleneck. The site's banks pad two axes per row: `phm_rank` (j)
 * and `block`, the bottleneck per hypercomplex block (bottleneck / n); zero
 * padding is exact, as every activation served is 0 at 0 and padded bias
 * slots are 0. n fixes the reshapes, so the site is built for one n,
 * COMPACTER_N (OpenDelta's default, 4). A compacter the site cannot serve
 * cheaper — another n, a W saved whole (factorized_phm=false), a rank so large
 * that its factors outweigh the product — is multiplied out at registration
 * and served through the adapter site, which GET /v1/deltas/{id} shows.
 *
 * OpenDelta names it `<module>.compactor.{down_sampler,up_sampler}.{phm_rule |
 * phm_rule_left, phm_rule_right, W | W_left, W_right, b}`. Shared rules and
 * weights (shared_phm_rule, shared_W_phm) are refused: OpenDelta's own
 * CompacterModel cannot save them.
 */
import { z } from 'zod';
import type { GraphSite } from '../../backbone/rewrite/delta-sites.js';
import type { Tensor } from '../candidate.js';
import { OPENDELTA_CONFIG } from '../formats/files.js';
import { ACTIVATIONS, activationMix, activationOf, adapterSite, bottleneckRows, type Activation } from './adapter.js';
import { readSchema } from '../problems.js';
import { defineKind, expectShape, needParts, type BuildContext, type SiteRows } from './kind.js';

/** The hypercomplex division the compacter site is built for: OpenDelta's default. */
export const COMPACTER_N = 4;
const N = COMPACTER_N;

/**
 * The compacter site on a module of `hidden` output features (y: the module's
 * output, [rows, seq, hidden]); j runs over `phm_rank`, p over `block`.
 * (On a module whose features n does not divide, no row is ever factored:
 * its banks' sizes are only rounded to be sizes.)
 *
 *   down_l [hidden/n, (i,j)]    down_n [(a,i,j), (c,p)]   down_bias [1, (c,p)]
 *   up_m   [(a,p), (c,i,j)]     up_r   [(i,j), hidden/n]  up_bias   [1, hidden]
 */
export const compacterSite: GraphSite = {
  name: 'compacter',
  banks: [
    { key: 'compacter_down_l', dims: (m) => [Math.floor(m.outFeatures / N), [N, 'phm_rank']], neutral: 0 },
    { key: 'compacter_down_n', dims: () => [[N, N, 'phm_rank'], [N, 'block']], neutral: 0 },
    { key: 'compacter_down_bias', dims: () => [1, [N, 'block']], neutral: 0 },
    { key: 'compacter_up_m', dims: () => [[N, 'block'], [N, N, 'phm_rank']], neutral: 0 },
    { key: 'compacter_up_r', dims: (m) => [[N, 'phm_rank'], Math.floor(m.outFeatures / N)], neutral: 0 },
    { key: 'compacter_up_bias', dims: (m) => [1, m.outFeatures], neutral: 0 },
    { key: 'compacter_act', dims: () => [1, ACTIVATIONS.length], neutral: 0, selector: true },
  ],
  gated: true,
  // Where the adapter site is: OpenDelta puts compacters on the same modules.
  defaultModules: (info) => info.defaultTargets.adapter ?? 'all',
  output({ g, y, bank, features }) {
    // 4-D, [rows, seq, n, ·], so every reshape's inferred size (-1) sits beside known sizes that are never 0:
    // on a module no row uses while another module's rows switch the site on, the padded axes are 0.
    const perBlock = Math.floor(features.outFeatures / N);
    const byBlock = (t: string, last: number) => g.op('Reshape', [t, g.ints([0, 0, N, last])]);
    const perRow = (bankKey: string, dims: number[]) => g.op('Reshape', [bank(bankKey), g.ints(dims)]);
    // Down: y as [rows, seq, n, hidden/n] · L' → [rows, seq, n, (i,j)] → [rows, seq, (a,i,j)] · N → [rows, seq, (c,p)].
    const u = g.op('MatMul', [byBlock(y, perBlock), perRow('compacter_down_l', [0, 1, perBlock, -1])]);
    const ua = g.op('Reshape', [u, g.ints([0, 0, -1])]);
    const z = g.op('Add', [g.op('MatMul', [ua, bank('compacter_down_n')]), bank('compacter_down_bias')]);
    // Up: act(z) · M → [rows, seq, (c,i,j)] → [rows, seq, n, (i,j)] · R' → [rows, seq, n, hidden/n] → [rows, seq, hidden].
    const v = g.op('MatMul', [activationMix(g, z, bank('compacter_act')), bank('compacter_up_m')]);
    const o = g.op('MatMul', [byBlock(v, -1), perRow('compacter_up_r', [0, 1, -1, perBlock])]);
    const up = g.op('Reshape', [o, g.ints([0, 0, -1])]);
    return g.op('Add', [g.op('Add', [y, up]), bank('compacter_up_bias')]);
  },
};

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

/** One PHM layer as saved: rule [n, n, n], W [n, in/n, out/n] or its factors [n, in/n, r]·[n, r, out/n], bias [out] or null. */
interface PhmLayer {
  inF: number;
  outF: number;
  rule: Float32Array;
  w: { left: Float32Array; right: Float32Array } | { whole: Float32Array };
  bias: Float32Array | null;
}

/** H = Σᵢ ruleᵢ ⊗ Wᵢ: H[a·(in/n) + k, c·(out/n) + p] = Σᵢ rule[i, a, c] · W[i, k, p]. */
function phmWeight(l: PhmLayer, n: number, r: number): Float32Array {
  const { inF, outF, rule } = l;
  const [ki, ko] = [inF / n, outF / n];
  const w = 'whole' in l.w ? l.w.whole : bmm(l.w.left, l.w.right, n, ki, r, ko);
  const h = new Float32Array(inF * outF);
  for (let i = 0; i < n; i++) {
    for (let a = 0; a < n; a++) {
      for (let c = 0; c < n; c++) {
        const v = rule[(i * n + a) * n + c];
        if (v === 0) continue;
        for (let k = 0; k < ki; k++) {
          const row = (a * ki + k) * outF + c * ko;
          const src = (i * ki + k) * ko;
          for (let p = 0; p < ko; p++) h[row + p] += v * w[src + p];
        }
      }
    }
  }
  return h;
}

/** One PHM layer's tensors, checked, or null after reporting every problem. */
function phmLayer(
  parts: ReadonlyMap<string, Tensor>, at: BuildContext<CompacterSettings>, sampler: string, inF: number, outF: number, bias: boolean,
): PhmLayer | null {
  const cfg = at.settings;
  const n = cfg.hypercomplex_division;
  const want = phmParts(cfg, bias);
  if (!needParts(parts, want.map((p) => `${sampler}.${p}`), at)) return null;
  const t = (p: string) => parts.get(`${sampler}.${p}`)!.data;
  if (inF % n || outF % n) {
    at.problems.invalid(`module '${at.module.name}': its ${sampler} maps ${inF} to ${outF} features, which hypercomplex_division ${n} does not divide`);
    return null;
  }
  const [ki, ko, r] = [inF / n, outF / n, cfg.phm_rank];
  const shapes: Record<string, number[]> = {
    phm_rule: [n, n, n], phm_rule_left: [n, n, 1], phm_rule_right: [n, 1, n],
    W: [n, ki, ko], W_left: [n, ki, r], W_right: [n, r, ko], b: [outF],
  };
  const ok = want.map((p) => expectShape(at, `${sampler}.${p}`, parts.get(`${sampler}.${p}`)!, shapes[p]));
  if (!ok.every(Boolean)) return null;
  return {
    inF, outF,
    rule: cfg.factorized_phm_rule ? bmm(t('phm_rule_left'), t('phm_rule_right'), n, n, 1, n) : t('phm_rule'),
    w: cfg.factorized_phm ? { left: t('W_left'), right: t('W_right') } : { whole: t('W') },
    bias: bias ? t('b').slice() : null,
  };
}

/**
 * A factored PHM layer's two banks: Σᵢ (Iₙ ⊗ Lᵢ)(ruleᵢ ⊗ Rᵢ) as L' [in/n, (i,j)] and N [(a,i,j), out]
 * (`leftFirst`), or Σᵢ (ruleᵢ ⊗ Lᵢ)(Iₙ ⊗ Rᵢ) as M [in, (c,i,j)] and R' [(i,j), out/n].
 */
function phmFactors(l: PhmLayer, r: number, leftFirst: boolean): [Float32Array, Float32Array] {
  if ('whole' in l.w) throw new Error('a PHM layer saved whole has no factors');
  const { left, right } = l.w;
  const [ki, ko] = [l.inF / N, l.outF / N];
  const rule = (i: number, a: number, c: number) => l.rule[(i * N + a) * N + c];
  const L = (i: number, k: number, j: number) => left[(i * ki + k) * r + j];
  const R = (i: number, j: number, p: number) => right[(i * r + j) * ko + p];
  const ij = N * r;
  if (leftFirst) {
    const lp = new Float32Array(ki * ij);
    const np = new Float32Array(N * ij * l.outF);
    for (let i = 0; i < N; i++) {
      for (let j = 0; j < r; j++) {
        for (let k = 0; k < ki; k++) lp[k * ij + i * r + j] = L(i, k, j);
        for (let a = 0; a < N; a++) {
          for (let c = 0; c < N; c++) for (let p = 0; p < ko; p++) np[(a * ij + i * r + j) * l.outF + c * ko + p] = rule(i, a, c) * R(i, j, p);
        }
      }
    }
    return [lp, np];
  }
  const m = new Float32Array(l.inF * N * ij);
  const rp = new Float32Array(ij * ko);
  for (let i = 0; i < N; i++) {
    for (let j = 0; j < r; j++) {
      for (let p = 0; p < ko; p++) rp[(i * r + j) * ko + p] = R(i, j, p);
      for (let a = 0; a < N; a++) {
        for (let k = 0; k < ki; k++) for (let c = 0; c < N; c++) m[(a * ki + k) * N * ij + c * ij + i * r + j] = rule(i, a, c) * L(i, k, j);
      }
    }
  }
  return [m, rp];
}

/** Whether the compacter site serves it, with fewer bank floats per row than its product: 2·r·(hidden + n²·bottleneck) < 2·hidden·bottleneck. */
function servedFactored(cfg: CompacterSettings, hidden: number, bottleneck: number): boolean {
  return cfg.factorized_phm && cfg.hypercomplex_division === N && cfg.phm_rank * (hidden + N * N * bottleneck) < hidden * bottleneck;
}

/** The compacter site's row: both layers' factors, biases (0 where absent: every bank is written), the activation. */
function factoredRows(down: PhmLayer, up: PhmLayer, r: number, bottleneck: number, activation: Activation): SiteRows {
  const [l, n] = phmFactors(down, r, true);
  const [m, rp] = phmFactors(up, r, false);
  const act = new Float32Array(ACTIVATIONS.length);
  act[ACTIVATIONS.indexOf(activation)] = 1;
  return {
    rank: bottleneck,
    axes: { phm_rank: r, block: bottleneck / N },
    site: compacterSite,
    data: {
      compacter_down_l: l, compacter_down_n: n, compacter_down_bias: down.bias ?? new Float32Array(bottleneck),
      compacter_up_m: m, compacter_up_r: rp, compacter_up_bias: up.bias ?? new Float32Array(up.outF),
      compacter_act: act,
    },
  };
}

export const compacter = defineKind<CompacterSettings>({
  type: 'compacter',
  site: compacterSite,
  otherSites: [adapterSite],
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
    if (servedFactored(cfg, hidden, bottleneck)) return factoredRows(down, up, cfg.phm_rank, bottleneck, cfg.activation);
    const [n, r] = [cfg.hypercomplex_division, cfg.phm_rank];
    return {
      ...bottleneckRows({
        reads: 'output', bottleneck, activation: cfg.activation,
        down: phmWeight(down, n, r), downBias: down.bias, up: phmWeight(up, n, r), upBias: up.bias,
      }),
      site: adapterSite,
    };
  },
});
