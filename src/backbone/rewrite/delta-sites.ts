/**
 * Delta sites: side branches spliced onto linear modules, fed by per-row banks
 * so every row of a batch can carry a different delta, of a different kind
 * and rank.
 *
 * What a kind of site computes (LoRA's `y + (x·A)·B`, an adapter's bottleneck,
 * IA³'s scales, BitFit's bias) lives with its delta kind in src/deltas/kinds;
 * this file only splices. For each planned module it hands every site the
 * module's input x and output y as [batch, seq, features] (GPT-2's Gemm sees a
 * 2-D view; per-row banks need the rows back), declares the site's banks as
 * graph inputs `delta.<module>.<key>` of shape [rows|1, a, b], chains the
 * sites' ops, rewires the module's MatMul to a replaced input and every reader
 * of its output to the delta-applied value.
 *
 * Banks are laid out in row order, so no in-graph Gather copies them each
 * step. A site no row uses is fed a zero-size rank (ORT skips the MatMuls) or,
 * where a provider cannot take zero-size tensors, a rank-1 slice of neutral
 * values; a gated site sits in an If that skips it whole.
 */
import { DataType, type GraphBuilder } from '../onnx/graph-builder.js';
import { onnx } from '../onnx/proto.js';
import type { LinearSite } from '../modules.js';
import type { BackboneInfo } from '../types.js';
import type { GraphEditor } from './editor.js';

const GRAPH_ATTR = onnx.AttributeProto.AttributeType.GRAPH;

/**
 * One factor of a bank's per-row slice: a fixed size, or the name of one of
 * the site's padded axes (a LoRA's `rank`, a compacter's `phm_rank`), whose
 * size in a step is the largest among the step's rows.
 */
export type BankDim = number | string;

/**
 * One side of a row's slice: a factor, or the product of several, outermost
 * first. A padded axis inside a product pads each block of it, so a slice
 * laid out [(a, i, j), …] with j padded keeps every (a, i) block in place.
 */
export type BankSide = BankDim | readonly BankDim[];

/** Sizes of a site's padded axes: one row's, or the largest over a batch's rows. */
export type Axes = Readonly<Record<string, number>>;

export interface BankSpec {
  /** The graph input is `delta.<module>.<key>`. */
  key: string;
  /** One row's slice [a, b] for a module of these features (the input is [rows|1, a, b]). */
  dims(features: SiteFeatures): [BankSide, BankSide];
  /** What a row without this delta holds: 0 for terms that are added, 1 for scales. */
  neutral: 0 | 1;
  /** A per-row switch the kinds fill in (an activation selector), not a parameter: left out of a delta's shapes. */
  selector?: boolean;
}

export interface SiteFeatures {
  inFeatures: number;
  outFeatures: number;
}

/** What a site's ops get: where to add them, the module's input, its banks as graph inputs. */
export interface SiteOps {
  /** The graph, or the then-branch of a gated site's If. */
  g: GraphBuilder;
  /** The module's input, [batch, seq, in] (what its MatMul read before any site replaced it). */
  x: string;
  bank(key: string): string;
  /** The module's features, for shapes the site's ops fix at build time. */
  features: SiteFeatures;
}

/**
 * One kind of side branch on a linear module. The banks of a site on a module
 * share its padded axes (a LoRA's rank; a compacter's PHM rank and bottleneck
 * block), each the largest among the step's rows; a bank no row of a step
 * writes is fed one slice of neutral values with every axis 1, which the
 * site's ops must broadcast.
 */
export interface GraphSite {
  /** Its name in DELTASERVE_SITES, in plans and in `inspect` (lora, adapter, bias, ia3, compacter). */
  readonly name: string;
  readonly banks: readonly BankSpec[];
  /** Its output ops sit in an If on `delta.<name>.on`, skipped whole in a step no row uses the site. */
  readonly gated?: boolean;
  /** The modules it goes on unless DELTASERVE_SITES says otherwise: name suffixes, or every linear. */
  defaultModules(info: BackboneInfo): string[] | 'all';
  /** Ops before the module's MatMul: returns the input the MatMul reads instead. */
  input?(ops: SiteOps): string;
  /** Ops on `y`, the module's output so far ([batch, seq, out], its own bias included): returns the new output. */
  output?(ops: SiteOps & { y: string }): string;
}

/** A module's sites as the engine sees them: plain data, so it crosses to the worker thread. */
export interface SiteLayout extends SiteFeatures {
  module: string;
  /** Names of the graph sites on it, in chain order. */
  sites: string[];
}

export const bankInput = (module: string, key: string) => `delta.${module}.${key}`;

const factors = (side: BankSide): readonly BankDim[] => (Array.isArray(side) ? side : [side as BankDim]);

/** A row's slice of a bank at these axis sizes, every factor of both sides resolved, outermost first (an axis not given is 0). */
export function sliceShape(spec: BankSpec, features: SiteFeatures, axes: Axes): number[] {
  return spec.dims(features).flatMap(factors).map((d) => (typeof d === 'number' ? d : axes[d] ?? 0));
}

/** One row's slice of a bank at these axis sizes: [a, b]. */
export function sliceDims(spec: BankSpec, features: SiteFeatures, axes: Axes): [number, number] {
  const side = (s: BankSide) => factors(s).reduce<number>((n, d) => n * (typeof d === 'number' ? d : axes[d] ?? 0), 1);
  const [a, b] = spec.dims(features);
  return [side(a), side(b)];
}

/** The padded axes a bank's slices grow and shrink with (none for a bank of fixed size). */
export function paddedAxes(spec: BankSpec, features: SiteFeatures): string[] {
  return spec.dims(features).flatMap(factors).filter((d): d is string => typeof d === 'string');
}

/** A graph input's symbolic name for a side with padded axes (e.g. `compacter_4*phm_rank`). */
const symbolicSide = (site: string, side: BankSide): number | string => {
  const fs = factors(side);
  return fs.every((d) => typeof d === 'number') ? fs.reduce<number>((n, d) => n * (d as number), 1) : `${site}_${fs.join('*')}`;
};

export const gateInput = (site: string) => `delta.${site}.on`;

/**
 * `float16`: the graph computes in float16. Banks stay float32 (the engine builds every bank as a
 * Float32Array, and a delta's small products keep their precision): x and y are cast to float32
 * around the sites and the result back to float16.
 */
export function insertDeltaSites(g: GraphEditor, linear: LinearSite[], plan: ReadonlyMap<string, readonly GraphSite[]>, float16 = false): SiteLayout[] {
  const layouts: SiteLayout[] = [];
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
  const gated = new Set([...plan.values()].flat().filter((s) => s.gated).map((s) => s.name));
  for (const name of gated) g.input(gateInput(name), DataType.BOOL, []);

  let branchNo = 0;
  for (const site of linear) {
    const sites = plan.get(site.name);
    if (!sites?.length) continue;
    const { name: m, inFeatures: inF, outFeatures: outF } = site;
    // The editor's copy of the module's MatMul/Gemm (site.node belongs to the backbone's own graph).
    const node = g.nodes.find((n) => n.output?.[0] === site.node.output![0])!;
    layouts.push({ module: m, inFeatures: inF, outFeatures: outF, sites: sites.map((s) => s.name) });
    for (const s of sites) {
      for (const spec of s.banks) {
        const dims = spec.dims(site).map((side) => symbolicSide(s.name, side));
        g.input(bankInput(m, spec.key), DataType.FLOAT, ['delta_batch', ...dims]);
      }
    }
    const bank = (key: string) => bankInput(m, key);
    // The module's output keeps its name, so every reader sees the delta-applied value.
    const out = site.output;
    const producer = g.nodes.find((n) => n.output?.includes(out))!;
    const base = `${out}/base`;
    producer.output = producer.output!.map((o) => (o === out ? base : o));
    const scope = `/deltaserve/${m}`;

    g.scope(scope, () => {
      const toFloat = (t: string) => (float16 ? g.op('Cast', [t], { to: DataType.FLOAT }) : t);
      const toGraph = (t: string) => (float16 ? g.op('Cast', [t], { to: DataType.FLOAT16 }) : t);
      const input = node.input![0];
      // A 2-D view gets its rows back; an op that takes either rank (twoD null) is reshaped the same way,
      // a no-op on a 3-D input, and everything goes back to the tensor's own shape at the end.
      const flat = site.twoD !== false;
      const x = toFloat(flat ? g.op('Reshape', [input, shape3d(inF)]) : input);
      let xIn = x;
      for (const s of sites) if (s.input) xIn = s.input({ g, x: xIn, bank, features: site });
      if (xIn !== x) node.input![0] = toGraph(flat ? g.op('Reshape', [xIn, site.twoD ? g.ints([-1, inF]) : g.op('Shape', [input])]) : xIn);

      let y = toFloat(flat ? g.op('Reshape', [base, shape3d(outF)]) : base);
      for (const s of sites) {
        if (!s.output) continue;
        const h = y;
        const ops = (b: GraphBuilder) => ({ g: b, x, y: h, bank, features: site });
        if (!s.gated) {
          y = s.output(ops(g));
          continue;
        }
        const n = branchNo++;
        const thenBranch = g.subgraph(`site${n}_then`, `${scope}/${s.name}`, (sub) => [s.output!(ops(sub))]);
        const elseBranch = g.subgraph(`site${n}_else`, `${scope}/bare`, (sub) => [sub.op('Identity', [h])]);
        const branch = (name: string, graph: typeof thenBranch) => ({ name, type: GRAPH_ATTR, g: graph });
        y = g.op('If', [gateInput(s.name)], { then_branch: branch('then_branch', thenBranch), else_branch: branch('else_branch', elseBranch) });
      }
      y = toGraph(y);
      if (!flat) g.opNamed('Identity', [y], out);
      else g.opNamed('Reshape', [y, site.twoD ? g.ints([-1, outF]) : g.op('Shape', [base])], out);
    });
  }
  return layouts;
}
