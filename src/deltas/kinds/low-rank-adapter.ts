/**
 * Low-rank adapter (OpenDelta `low_rank_adapter`, the Compacter paper's
 * baseline): a bottleneck adapter on a module's output whose projections are
 * rank-1 products, W = W_left * W_right ([in, 1] times [1, out], broadcast as
 * OpenDelta's LowRankLinear computes it), y = x·W + b. The bottleneck is the
 * module's features / reduction_factor. Served as the adapter it computes,
 * multiplied out at registration: kept apart, its rank-1 factors would need a
 * site of their own (bench section "kinds" measures that branch both ways).
 *
 * OpenDelta names it `<module>.low_rank_adapter.{down_sampler,up_sampler}.{W_left,W_right,b}`.
 */
import { z } from 'zod';
import type { Tensor } from '../candidate.js';
import { OPENDELTA_CONFIG } from '../formats/files.js';
import { activationOf, adapterSite, bottleneckRows, type Activation } from './adapter.js';
import { readSchema } from '../problems.js';
import { defineKind, expectShape, needParts, type BuildContext } from './kind.js';

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

/** W_left * W_right (an outer product) and b of one LowRankLinear, or null after reporting its problems. */
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
  const w = new Float32Array(inF * outF);
  for (let i = 0; i < inF; i++) for (let o = 0; o < outF; o++) w[i * outF + o] = left.data[i] * right.data[o];
  return { weight: w, bias: b.data.slice() };
}

export const lowRankAdapter = defineKind<LowRankSettings>({
  type: 'low_rank_adapter',
  site: adapterSite,
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
    return bottleneckRows({
      reads: 'output', bottleneck, activation: at.settings.activation,
      down: down.weight, downBias: down.bias, up: up.weight, upBias: up.bias,
    });
  },
});
