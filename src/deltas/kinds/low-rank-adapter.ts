/**
 * Low-rank adapter (OpenDelta `low_rank_adapter`, the Compacter paper's
 * baseline): a bottleneck adapter on a module's output, added to it as
 * OpenDelta's post_forward does (y + up(act(down(y)))), whose projections are
 * LowRankLinears, y = x·W + b with W = W_left * W_right ([in, 1] times
 * [1, out], broadcast: a rank-1 outer product). The bottleneck is the
 * module's features / reduction_factor.
 *
 * Served factored, through a site of its own: the multiplied-out adapter
 * would hold 2·hidden·bottleneck floats per row and module where the factors
 * are 2·(hidden + bottleneck), and the branch takes 0.37× the time at batch
 * 32 (bench section "kinds", 5b). With rank 1 each product is a GEMV and a
 * broadcast Mul:
 *
 *   s = y·l_d            [rows, seq, 1]
 *   z = s ⊙ r_d + b_d    [rows, seq, bottleneck]
 *   t = act(z)·l_u       [rows, seq, 1]
 *   y' = y + t ⊙ r_u + b_u
 *
 * The site's banks pad one axis per row, `bottleneck`; zero padding is exact,
 * as every activation served is 0 at 0 and padded r_d, b_d and l_u slots are 0.
 * The rank is not an axis: OpenDelta's LowRankLinear only runs at rank 1
 * (its elementwise product does not broadcast otherwise), and other ranks are
 * refused at registration.
 *
 * OpenDelta names it `<module>.low_rank_adapter.{down_sampler,up_sampler}.{W_left,W_right,b}`.
 */
import { z } from 'zod';
import type { GraphSite } from '../../backbone/rewrite/delta-sites.js';
import type { Tensor } from '../candidate.js';
import { OPENDELTA_CONFIG } from '../formats/files.js';
import { ACTIVATIONS, activationMix, activationOf, type Activation } from './adapter.js';
import { readSchema } from '../problems.js';
import { defineKind, expectShape, needParts, type BuildContext } from './kind.js';

/**
 * The low-rank adapter site on a module of `hidden` output features (y: the
 * module's output, [rows, seq, hidden]); b runs over the padded `bottleneck`.
 *
 *   lowrank_down_l [hidden, 1]   lowrank_down_r [1, b]        lowrank_down_bias [1, b]
 *   lowrank_up_l   [b, 1]        lowrank_up_r   [1, hidden]   lowrank_up_bias   [1, hidden]
 */
export const lowRankAdapterSite: GraphSite = {
  name: 'low_rank_adapter',
  banks: [
    { key: 'lowrank_down_l', dims: (m) => [m.outFeatures, 1], neutral: 0 },
    { key: 'lowrank_down_r', dims: () => [1, 'bottleneck'], neutral: 0 },
    { key: 'lowrank_down_bias', dims: () => [1, 'bottleneck'], neutral: 0 },
    { key: 'lowrank_up_l', dims: () => ['bottleneck', 1], neutral: 0 },
    { key: 'lowrank_up_r', dims: (m) => [1, m.outFeatures], neutral: 0 },
    { key: 'lowrank_up_bias', dims: (m) => [1, m.outFeatures], neutral: 0 },
    { key: 'lowrank_act', dims: () => [1, ACTIVATIONS.length], neutral: 0, selector: true },
  ],
  gated: true,
  // Where the adapter site is: OpenDelta puts low-rank adapters on the same modules.
  defaultModules: (info) => info.defaultTargets.adapter ?? 'all',
  output({ g, y, bank }) {
    const s = g.op('MatMul', [y, bank('lowrank_down_l')]);
    const z = g.op('Add', [g.op('Mul', [s, bank('lowrank_down_r')]), bank('lowrank_down_bias')]);
    const t = g.op('MatMul', [activationMix(g, z, bank('lowrank_act')), bank('lowrank_up_l')]);
    return g.op('Add', [g.op('Add', [y, g.op('Mul', [t, bank('lowrank_up_r')])]), bank('lowrank_up_bias')]);
  },
};

// OpenDelta's LowRankAdapterConfig defaults.
const Settings = z.looseObject({
  reduction_factor: z.number().int().positive().default(32),
  non_linearity: z.string().default('gelu_new'),
  low_rank_rank: z.number().int().positive().default(1),
});

interface LowRankSettings {
  reductionFactor: number;
  activation: Activation;
}

/** One LowRankLinear's W_left [in, 1], W_right [1, out] and b [out], checked, or null after reporting its problems. */
function lowRankLinear(parts: ReadonlyMap<string, Tensor>, at: BuildContext<LowRankSettings>, sampler: string, inF: number, outF: number) {
  const got = needParts(parts, ['W_left', 'W_right', 'b'].map((p) => `${sampler}.${p}`), at);
  if (!got) return null;
  const [left, right, b] = got;
  const ok = [
    expectShape(at, `${sampler}.W_left`, left, [inF, 1]),
    expectShape(at, `${sampler}.W_right`, right, [1, outF]),
    expectShape(at, `${sampler}.b`, b, [outF]),
  ];
  if (!ok.every(Boolean)) return null;
  return { left: left.data.slice(), right: right.data.slice(), bias: b.data.slice() };
}

export const lowRankAdapter = defineKind<LowRankSettings>({
  type: 'low_rank_adapter',
  site: lowRankAdapterSite,
  opendelta: {
    name: 'low_rank_adapter',
    settings(config, problems) {
      const cfg = readSchema(Settings, config, OPENDELTA_CONFIG, problems);
      if (!cfg) return null;
      if (cfg.low_rank_rank !== 1) {
        problems.unsupported(
          `low_rank_rank is ${cfg.low_rank_rank}: OpenDelta's LowRankLinear multiplies W_left and W_right elementwise, ` +
          'which makes a weight only at rank 1 (it fails to run otherwise); save the adapter with low_rank_rank=1',
        );
      }
      return { reductionFactor: cfg.reduction_factor, activation: activationOf(cfg.non_linearity, problems) };
    },
    key(name) {
      const m = /^(.+)\.low_rank_adapter\.(down_sampler|up_sampler)\.(W_left|W_right|b)$/.exec(name);
      return m ? { module: m[1], part: `${m[2]}.${m[3]}` } : null;
    },
    expected: '<module>.low_rank_adapter.down_sampler/up_sampler .W_left, .W_right and .b',
  },
  build(parts, at) {
    const hidden = at.module.outFeatures;
    const bottleneck = Math.floor(hidden / at.settings.reductionFactor);
    if (bottleneck < 1) {
      at.problems.invalid(`module '${at.module.name}': reduction_factor ${at.settings.reductionFactor} leaves no bottleneck of its ${hidden} features`);
      return null;
    }
    const down = lowRankLinear(parts, at, 'down_sampler', hidden, bottleneck);
    const up = lowRankLinear(parts, at, 'up_sampler', bottleneck, hidden);
    if (!down || !up) return null;
    const act = new Float32Array(ACTIVATIONS.length);
    act[ACTIVATIONS.indexOf(at.settings.activation)] = 1;
    return {
      rank: bottleneck,
      axes: { bottleneck },
      data: {
        lowrank_down_l: down.left, lowrank_down_r: down.right, lowrank_down_bias: down.bias,
        lowrank_up_l: up.left, lowrank_up_r: up.right, lowrank_up_bias: up.bias,
        lowrank_act: act,
      },
    };
  },
});
