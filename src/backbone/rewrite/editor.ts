/**
 * A mutable copy of a graph for rewrite passes: new nodes are added through a
 * GraphBuilder (torch-style names under a `/deltaserve` scope); initializers
 * are shared with the original model, never copied.
 */
import { GraphBuilder } from '../onnx/graph-builder.js';
import { GraphIndex, nodeReads } from '../onnx/graph-index.js';
import { encodeModel, type ModelProto, type NodeProto } from '../onnx/proto.js';

export class GraphEditor extends GraphBuilder {
  constructor(private readonly original: ModelProto) {
    super();
    this.constPrefix = 'deltaserve::Const_';
    const g = original.graph!;
    this.nodes.push(...(g.node ?? []).map((n) => ({ ...n, input: [...(n.input ?? [])], output: [...(n.output ?? [])] })));
    this.initializers.push(...(g.initializer ?? []));
    this.inputs.push(...(g.input ?? []));
    this.outputs.push(...(g.output ?? []));
  }

  index(): GraphIndex {
    return new GraphIndex(this.graph('index'));
  }

  removeNodes(dead: Set<NodeProto>): void {
    const keep = this.nodes.filter((n) => !dead.has(n));
    this.nodes.length = 0;
    this.nodes.push(...keep);
  }

  removeOutput(name: string): void {
    const i = this.outputs.findIndex((o) => o.name === name);
    if (i >= 0) this.outputs.splice(i, 1);
  }

  /** Removes nodes whose outputs nobody reads, repeatedly (a rewrite leaves dead branches). */
  pruneDead(): void {
    for (;;) {
      const idx = this.index();
      const dead = new Set(this.nodes.filter((n) =>
        (n.output ?? []).every((o) => idx.consumersOf(o).length === 0 && !idx.isGraphOutput(o))));
      if (dead.size === 0) break;
      this.removeNodes(dead);
    }
    const read = new Set(this.nodes.flatMap(nodeReads));
    const live = this.initializers.filter((t) => read.has(t.name!));
    this.initializers.length = 0;
    this.initializers.push(...live);
  }

  /** ONNX wants nodes in topological order; rewrites append nodes wherever is convenient. */
  sortTopologically(): void {
    const available = new Set<string>([
      ...this.inputs.map((i) => i.name!), ...this.initializers.map((t) => t.name!), '',
    ]);
    const pending = [...this.nodes];
    const sorted: NodeProto[] = [];
    while (pending.length) {
      const before = pending.length;
      for (let i = 0; i < pending.length;) {
        const n = pending[i];
        if (nodeReads(n).every((x) => available.has(x))) {
          sorted.push(n);
          for (const o of n.output ?? []) available.add(o);
          pending.splice(i, 1);
        } else i++;
      }
      if (pending.length === before) {
        throw new Error(`graph rewrite left unresolved inputs at ${pending[0].name}: ${nodeReads(pending[0]).filter((x) => !available.has(x)).join(', ')}`);
      }
    }
    this.nodes.length = 0;
    this.nodes.push(...sorted);
  }

  encodeModel(): Uint8Array {
    this.pruneDead();
    this.sortTopologically();
    return encodeModel({ ...this.original, graph: this.graph(this.original.graph?.name ?? 'deltaserve') });
  }
}
