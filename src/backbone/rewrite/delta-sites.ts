/**
 * Delta sites: side branches on linear modules, fed by per-row banks so every
 * row of a batch can carry a different delta, of a different kind and rank.
 *
 *   y  = x·W (+b)                                    the original MatMul / Gemm
 *   y' = y + (x·A)·B                                 LoRA      A: [B|1, in, R]  B: [B|1, R, out]
 *   y''= y' + act(y'·D + d)·U                        adapter   D: [B|1, out, R] d: [B|1, 1, R] U: [B|1, R, out]
 *   y'''= y'' + b                                    bias      b: [B|1, 1, out] (adapter up-bias + BitFit)
 *
 * Banks are laid out in row order, so no in-graph Gather copies them each
 * step. A site no row uses is fed a zero-size rank (ORT skips the MatMuls) and
 * a batch dimension of 1 (broadcast), so it costs next to nothing.
 */
import { DataType, type GraphBuilder } from '../onnx/graph-builder.js';
import { onnx } from '../onnx/proto.js';

const GRAPH_ATTR = onnx.AttributeProto.AttributeType.GRAPH;
import type { LinearSite } from '../modules.js';
import { geluErf, geluNew, silu } from '../onnx/activations.js';
import type { GraphEditor } from './editor.js';

export type SiteKind = 'lora' | 'adapter' | 'bias';

/** The kind of site each kind of delta needs (BitFit is a bias). */
export const SITE_KIND = { lora: 'lora', adapter: 'adapter', bitfit: 'bias' } as const satisfies Record<string, SiteKind>;

export const ACTIVATIONS = ['relu', 'gelu', 'gelu_new', 'silu'] as const;

export const siteInput = {
  loraA: (m: string) => `delta.${m}.lora_a`,
  loraB: (m: string) => `delta.${m}.lora_b`,
  adapterDown: (m: string) => `delta.${m}.adapter_down`,
  adapterDownBias: (m: string) => `delta.${m}.adapter_down_bias`,
  adapterUp: (m: string) => `delta.${m}.adapter_up`,
  bias: (m: string) => `delta.${m}.bias`,
  activation: (a: (typeof ACTIVATIONS)[number]) => `delta.act.${a}`,
};

export interface SiteLayout {
  module: string;
  inFeatures: number;
  outFeatures: number;
  kinds: SiteKind[];
}

function activationMix(g: GraphBuilder, z: string): string {
  const relu = g.op('Relu', [z]);
  const acts = [relu, geluErf(g, z), geluNew(g, z), silu(g, z)];
  const parts = acts.map((a, i) => g.op('Mul', [a, siteInput.activation(ACTIVATIONS[i])]));
  return parts.reduce((acc, p) => g.op('Add', [acc, p]));
}

/**
 * Adapter branches sit inside an If on `delta.adapters_on`: a step with no
 * adapter row skips them whole, where empty tensors would still cost a few
 * dozen kernel launches per site (the activation mix above all).
 */
export const ADAPTERS_ON = 'delta.adapters_on';

export function insertDeltaSites(g: GraphEditor, linear: LinearSite[], plan: Map<string, SiteKind[]>): SiteLayout[] {
  const layouts: SiteLayout[] = [];
  const floatIn = (name: string, dims: (number | string)[]) => g.input(name, DataType.FLOAT, dims);
  const shapes = new Map<number, string>();
  // [batch, -1, features]: GPT-2's Gemm sees [batch*seq, features]; per-row banks need the rows back.
  const shape3d = (features: number) => {
    let s = shapes.get(features);
    if (!s) {
      s = g.scope('/deltaserve', () => {
        const batch = g.op('Slice', [g.op('Shape', ['input_ids']), g.ints([0]), g.ints([1]), g.ints([0])]);
        return g.op('Concat', [batch, g.ints([-1, features])], { axis: 0 });
      });
      shapes.set(features, s);
    }
    return s;
  };
  if ([...plan.values()].some((k) => k.includes('adapter'))) {
    g.input(ADAPTERS_ON, DataType.BOOL, []);
    for (const a of ACTIVATIONS) floatIn(siteInput.activation(a), ['delta_batch', 1, 1]);
  }

  let siteNo = 0;
  for (const site of linear) {
    const kinds = plan.get(site.name);
    if (!kinds?.length) continue;
    const { name: m, inFeatures: inF, outFeatures: outF } = site;
    layouts.push({ module: m, inFeatures: inF, outFeatures: outF, kinds });
    // The module's output keeps its name, so every reader sees the delta-applied value.
    const out = site.output;
    const producer = g.nodes.find((n) => n.output?.includes(out))!;
    const base = `${out}/base`;
    producer.output = producer.output!.map((o) => (o === out ? base : o));
    const scope = `/deltaserve/${m}`;

    g.scope(scope, () => {
      let y = site.twoD ? g.op('Reshape', [base, shape3d(outF)]) : base;
      if (kinds.includes('lora')) {
        const a = floatIn(siteInput.loraA(m), ['delta_batch', inF, 'lora_rank']);
        const b = floatIn(siteInput.loraB(m), ['delta_batch', 'lora_rank', outF]);
        const x = site.twoD ? g.op('Reshape', [site.node.input![0], shape3d(inF)]) : site.node.input![0];
        y = g.op('Add', [y, g.op('MatMul', [g.op('MatMul', [x, a]), b])]);
      }
      if (kinds.includes('adapter')) {
        const h = y;
        const down = floatIn(siteInput.adapterDown(m), ['delta_batch', outF, 'adapter_rank']);
        const downBias = floatIn(siteInput.adapterDownBias(m), ['delta_batch', 1, 'adapter_rank']);
        const up = floatIn(siteInput.adapterUp(m), ['delta_batch', 'adapter_rank', outF]);
        const n = siteNo++;
        const thenBranch = g.subgraph(`site${n}_then`, `${scope}/adapter`, (sub) => {
          const z = sub.op('Add', [sub.op('MatMul', [h, down]), downBias]);
          return [sub.op('Add', [h, sub.op('MatMul', [activationMix(sub, z), up])])];
        });
        const elseBranch = g.subgraph(`site${n}_else`, `${scope}/bare`, (sub) => [sub.op('Identity', [h])]);
        const graphAttr = (name: string, graph: typeof thenBranch) => ({ name, type: GRAPH_ATTR, g: graph });
        y = g.op('If', [ADAPTERS_ON], { then_branch: graphAttr('then_branch', thenBranch), else_branch: graphAttr('else_branch', elseBranch) });
      }
      // After the adapter: the bias bank holds adapters' up-projection bias as well as BitFit's.
      if (kinds.includes('bias')) y = g.op('Add', [y, floatIn(siteInput.bias(m), ['delta_batch', 1, outF])]);
      g.opNamed(site.twoD ? 'Reshape' : 'Identity', site.twoD ? [y, g.ints([-1, outF])] : [y], out);
    });
  }
  return layouts;
}
