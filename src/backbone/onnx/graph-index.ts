/** Producer/consumer lookups over a graph, for the rewrite passes. */
import type { GraphProto, NodeProto, TensorProto } from './proto.js';

/**
 * Everything a node reads: its inputs, and the outer tensors its subgraphs
 * (If branches) read by name.
 */
export function nodeReads(node: NodeProto): string[] {
  const reads = (node.input ?? []).filter(Boolean);
  for (const a of node.attribute ?? []) {
    for (const sub of [a.g, ...(a.graphs ?? [])]) {
      if (!sub) continue;
      const local = new Set([
        ...(sub.initializer ?? []).map((t) => t.name!),
        ...(sub.input ?? []).map((i) => i.name!),
        ...(sub.node ?? []).flatMap((n) => n.output ?? []),
      ]);
      for (const n of sub.node ?? []) for (const r of nodeReads(n)) if (!local.has(r)) reads.push(r);
      for (const o of sub.output ?? []) if (!local.has(o.name!)) reads.push(o.name!);
    }
  }
  return reads;
}

export class GraphIndex {
  readonly producer = new Map<string, NodeProto>();
  readonly consumers = new Map<string, NodeProto[]>();
  readonly initializers = new Map<string, TensorProto>();

  constructor(readonly graph: GraphProto) {
    for (const t of graph.initializer ?? []) this.initializers.set(t.name!, t);
    for (const n of graph.node ?? []) {
      for (const o of n.output ?? []) this.producer.set(o, n);
      for (const i of nodeReads(n)) {
        const list = this.consumers.get(i) ?? [];
        list.push(n);
        this.consumers.set(i, list);
      }
    }
  }

  consumersOf(tensor: string): NodeProto[] {
    return this.consumers.get(tensor) ?? [];
  }

  isGraphOutput(tensor: string): boolean {
    return (this.graph.output ?? []).some((o) => o.name === tensor);
  }
}

/** `/transformer/h.0/attn/c_attn/Gemm` → `transformer.h.0.attn.c_attn`: the module path PEFT uses. */
export function modulePathOf(nodeName: string): string | null {
  const parts = nodeName.split('/').filter(Boolean);
  if (parts.length < 2) return null;
  return parts.slice(0, -1).join('.');
}
