/** Producer/consumer lookups over a graph, for the rewrite passes. */
import type { GraphProto, NodeProto, TensorProto } from './proto.js';

export class GraphIndex {
  readonly producer = new Map<string, NodeProto>();
  readonly consumers = new Map<string, NodeProto[]>();
  readonly initializers = new Map<string, TensorProto>();

  constructor(readonly graph: GraphProto) {
    for (const t of graph.initializer ?? []) this.initializers.set(t.name!, t);
    for (const n of graph.node ?? []) {
      for (const o of n.output ?? []) this.producer.set(o, n);
      for (const i of n.input ?? []) {
        if (!i) continue;
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
