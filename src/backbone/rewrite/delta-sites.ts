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
import { DataType } from '../onnx/graph-builder.js';
import type { LinearSite } from '../modules.js';
import { geluErf, geluNew, silu } from '../onnx/activations.js';
import type { GraphEditor } from './editor.js';

export type SiteKind = 'lora' | 'adapter' | 'bias';

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

function activationMix(g: GraphEditor, z: string): string {
  const relu = g.op('Relu', [z]);
  const acts = [relu, geluErf(g, z), geluNew(g, z), silu(g, z)];
  const parts = acts.map((a, i) => g.op('Mul', [a, siteInput.activation(ACTIVATIONS[i])]));
  return parts.reduce((acc, p) => g.op('Add', [acc, p]));
}

export function insertDeltaSites(g: GraphEditor, linear: LinearSite[], plan: Map<string, SiteKind[]>): SiteLayout[] {
  const layouts: SiteLayout[] = [];
  const floatIn = (name: string, dims: (number | string)[]) => g.input(name, DataType.FLOAT, dims);
  let batchDim: string | null = null;
  const batch = () => (batchDim ??= g.scope('/deltaserve', () =>
    g.op('Slice', [g.op('Shape', ['input_ids']), g.ints([0]), g.ints([1]), g.ints([0])])));
  if ([...plan.values()].some((k) => k.includes('adapter'))) {
    for (const a of ACTIVATIONS) floatIn(siteInput.activation(a), ['delta_batch', 1, 1]);
  }

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
    const to3d = (t: string, features: number) =>
      site.twoD ? g.op('Reshape', [t, g.op('Concat', [batch(), g.ints([-1, features])], { axis: 0 })]) : t;
    const from3d = (t: string, features: number) => (site.twoD ? g.op('Reshape', [t, g.ints([-1, features])]) : t);

    g.scope(`/deltaserve/${m}`, () => {
      let y = base;
      const adds: string[] = [];
      if (kinds.includes('lora')) {
        const a = floatIn(siteInput.loraA(m), ['delta_batch', inF, 'lora_rank']);
        const b = floatIn(siteInput.loraB(m), ['delta_batch', 'lora_rank', outF]);
        const xa = g.op('MatMul', [to3d(site.node.input![0], inF), a]);
        adds.push(from3d(g.op('MatMul', [xa, b]), outF));
      }
      if (adds.length) y = g.op('Add', [y, adds[0]]);
      if (kinds.includes('adapter')) {
        const down = floatIn(siteInput.adapterDown(m), ['delta_batch', outF, 'adapter_rank']);
        const downBias = floatIn(siteInput.adapterDownBias(m), ['delta_batch', 1, 'adapter_rank']);
        const up = floatIn(siteInput.adapterUp(m), ['delta_batch', 'adapter_rank', outF]);
        const z = g.op('Add', [g.op('MatMul', [to3d(y, outF), down]), downBias]);
        y = g.op('Add', [y, from3d(g.op('MatMul', [activationMix(g, z), up]), outF)]);
      }
      if (kinds.includes('bias')) {
        const b = floatIn(siteInput.bias(m), ['delta_batch', 1, outF]);
        y = from3d(g.op('Add', [to3d(y, outF), b]), outF);
      }
      g.opNamed('Identity', [y], out);
    });
  }
  return layouts;
}
