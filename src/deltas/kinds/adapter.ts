/**
 * Bottleneck adapters (OpenDelta `adapter`, Houlsby-style, on a module's
 * output): h + up(act(down(h))). Also the home of the adapter graph site,
 * which the other bottleneck kinds (parallel adapter, and compacters the
 * compacter site does not serve) are served through:
 *
 *   y' = y + act(y·D + x·P + d)·U + u      D: [out, R] from the output (sequential kinds)
 *                                          P: [in, R] from the input (parallel adapters)
 *
 * A row's delta fills D or P, never both; act is a per-row mix of relu, gelu,
 * gelu_new and silu selected by a one-hot. The site sits in an If, so a step
 * with no adapter row skips it whole: unused, its activation mix and Adds
 * cost 7–15 % of a GPT-2 small decode step.
 *
 * OpenDelta: `<module>.adapter.modulelist.{down_proj,up_proj}.{weight,bias}`,
 * nn.Linear weights ([bottleneck, dim] and [dim, bottleneck]).
 */
import { z } from 'zod';
import type { GraphBuilder } from '../../backbone/onnx/graph-builder.js';
import { geluErf, geluNew, silu } from '../../backbone/onnx/activations.js';
import type { GraphSite } from '../../backbone/rewrite/delta-sites.js';
import type { Tensor } from '../candidate.js';
import { OPENDELTA_CONFIG } from '../formats/files.js';
import { readSchema, type Problems } from '../problems.js';
import { defineKind, expectShape, needParts, transposed, type BuildContext, type SiteRows } from './kind.js';

export const ACTIVATIONS = ['relu', 'gelu', 'gelu_new', 'silu'] as const;
export type Activation = (typeof ACTIVATIONS)[number];

/** OpenDelta's `non_linearity` names (its Activations, then transformers' get_activation) for the four the site runs. */
const ACTIVATION_NAMES: Record<string, Activation> = {
  relu: 'relu', gelu: 'gelu', gelu_orig: 'gelu', gelu_new: 'gelu_new', silu: 'silu', swish: 'silu',
};

/**
 * A bottleneck kind's `non_linearity`. One the site cannot run is reported and
 * stood in for, so the rest of the delta is still checked and every problem listed.
 */
export function activationOf(name: string, problems: Problems): Activation {
  const act = ACTIVATION_NAMES[name.toLowerCase()];
  if (!act) {
    problems.unsupported(`non_linearity '${name}' is not supported; deltaserve runs adapters with ${Object.keys(ACTIVATION_NAMES).join(', ')}`);
  }
  return act ?? ACTIVATIONS[0];
}

/** The per-row activation: each of ACTIVATIONS of `z`, weighted by the row's one-hot `selector` ([rows|1, 1, 4]). */
export function activationMix(g: GraphBuilder, z: string, selector: string): string {
  const picks = g.nodeN('Split', [selector], ACTIVATIONS.length, { axis: 2 });
  const acts = [g.op('Relu', [z]), geluErf(g, z), geluNew(g, z), silu(g, z)];
  return acts.map((a, i) => g.op('Mul', [a, picks[i]])).reduce((acc, p) => g.op('Add', [acc, p]));
}

export const adapterSite: GraphSite = {
  name: 'adapter',
  banks: [
    { key: 'adapter_down', dims: (m) => [m.outFeatures, 'rank'], neutral: 0 },
    { key: 'adapter_in', dims: (m) => [m.inFeatures, 'rank'], neutral: 0 },
    { key: 'adapter_down_bias', dims: () => [1, 'rank'], neutral: 0 },
    { key: 'adapter_up', dims: (m) => ['rank', m.outFeatures], neutral: 0 },
    { key: 'adapter_up_bias', dims: (m) => [1, m.outFeatures], neutral: 0 },
    { key: 'adapter_act', dims: () => [1, ACTIVATIONS.length], neutral: 0, selector: true },
  ],
  gated: true,
  // Where OpenDelta puts bottleneck adapters by default: each block's output linears.
  defaultModules: (info) => info.defaultTargets.adapter ?? 'all',
  output({ g, x, y, bank }) {
    const z = g.op('Add', [g.op('Add', [g.op('MatMul', [y, bank('adapter_down')]), g.op('MatMul', [x, bank('adapter_in')])]), bank('adapter_down_bias')]);
    const up = g.op('MatMul', [activationMix(g, z, bank('adapter_act')), bank('adapter_up')]);
    return g.op('Add', [g.op('Add', [y, up]), bank('adapter_up_bias')]);
  },
};

export interface Bottleneck {
  /** Which tensor the down-projection reads: the module's output (sequential kinds) or its input (parallel). */
  reads: 'output' | 'input';
  bottleneck: number;
  /** [dim, bottleneck] in x·D order, where dim is the features it reads. */
  down: Float32Array;
  downBias: Float32Array | null;
  /** [bottleneck, out] */
  up: Float32Array;
  upBias: Float32Array | null;
  activation: Activation;
}

/** A bottleneck as one row of the adapter site's banks; absent biases stay zero. */
export function bottleneckRows(b: Bottleneck): SiteRows {
  const act = new Float32Array(ACTIVATIONS.length);
  act[ACTIVATIONS.indexOf(b.activation)] = 1;
  const data: Record<string, Float32Array> = {
    [b.reads === 'output' ? 'adapter_down' : 'adapter_in']: b.down,
    adapter_up: b.up,
    adapter_act: act,
  };
  if (b.downBias) data.adapter_down_bias = b.downBias;
  if (b.upBias) data.adapter_up_bias = b.upBias;
  return { rank: b.bottleneck, data };
}

/**
 * nn.Linear down_proj / up_proj pairs (OpenDelta's adapter and parallel
 * adapter): checks shapes against the features the adapter reads and writes,
 * transposes to x·W order and scales the output.
 */
export function linearPairRows(
  parts: ReadonlyMap<string, Tensor>, at: BuildContext<unknown>,
  s: { reads: 'output' | 'input'; bottleneck: number; activation: Activation; scale?: number },
): SiteRows | null {
  const got = needParts(parts, ['down_proj.weight', 'down_proj.bias', 'up_proj.weight', 'up_proj.bias'], at);
  if (!got) return null;
  const [dw, db, uw, ub] = got;
  const n = s.bottleneck;
  const dim = s.reads === 'output' ? at.module.outFeatures : at.module.inFeatures;
  const out = at.module.outFeatures;
  const ok = [
    expectShape(at, 'down_proj.weight', dw, [n, dim]),
    expectShape(at, 'down_proj.bias', db, [n]),
    expectShape(at, 'up_proj.weight', uw, [out, n]),
    expectShape(at, 'up_proj.bias', ub, [out]),
  ];
  if (!ok.every(Boolean)) return null;
  const scale = s.scale ?? 1;
  return bottleneckRows({
    reads: s.reads, bottleneck: n, activation: s.activation,
    down: transposed(dw.data, n, dim), downBias: db.data.slice(),
    up: transposed(uw.data, out, n, scale), upBias: ub.data.map((v) => v * scale),
  });
}

/** OpenDelta's `.modulelist.{down_proj,up_proj}.{weight,bias}` under a delta name. */
export function modulelistKey(deltaName: string) {
  const re = new RegExp(`^(.+)\\.${deltaName}\\.modulelist\\.(down_proj|up_proj)\\.(weight|bias)$`);
  return (name: string) => {
    const m = re.exec(name);
    return m ? { module: m[1], part: `${m[2]}.${m[3]}` } : null;
  };
}

// Defaults are OpenDelta's AdapterConfig's.
const Settings = z.looseObject({
  bottleneck_dim: z.number().int().positive().default(24),
  non_linearity: z.string().default('gelu_new'),
});

interface AdapterSettings {
  bottleneck: number;
  activation: Activation;
}

export const adapter = defineKind<AdapterSettings>({
  type: 'adapter',
  site: adapterSite,
  opendelta: {
    name: 'adapter',
    settings(config, problems) {
      const cfg = readSchema(Settings, config, OPENDELTA_CONFIG, problems);
      return cfg && { bottleneck: cfg.bottleneck_dim, activation: activationOf(cfg.non_linearity, problems) };
    },
    key: modulelistKey('adapter'),
    expected: '<module>.adapter.modulelist.down_proj.weight/.bias and up_proj.weight/.bias',
  },
  build: (parts, at) => linearPairRows(parts, at, { reads: 'output', ...at.settings }),
});
