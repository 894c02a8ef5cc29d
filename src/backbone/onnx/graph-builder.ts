/**
 * Builds ONNX graphs with the node and value names torch.onnx gives them
 * (`/transformer/h.0/attn/c_attn/Gemm`, output `..._output_0`), so graphs we
 * generate look to the rest of the server exactly like an Optimum export.
 */
import {
  attribute,
  DataType,
  encodeModel,
  floatTensor,
  int64Tensor,
  onnx,
  valueInfo,
  type AttrValue,
  type AttributeProto,
  type GraphProto,
  type ModelProto,
  type NodeProto,
  type TensorProto,
  type ValueInfoProto,
} from './proto.js';

export const OPSET = 17;

export class GraphBuilder {
  readonly nodes: NodeProto[] = [];
  readonly initializers: TensorProto[] = [];
  readonly inputs: ValueInfoProto[] = [];
  readonly outputs: ValueInfoProto[] = [];
  private readonly scopes: string[] = [];
  private readonly used = new Map<string, number>();
  private constCount = 0;
  /** Rewrites add constants to someone else's graph: their names must not collide. */
  protected constPrefix = 'onnx::Const_';

  /** Runs `fn` with node names under the absolute module scope `/a/b`, as torch scopes modules. */
  scope<T>(path: string, fn: () => T): T {
    this.scopes.push(path);
    try {
      return fn();
    } finally {
      this.scopes.pop();
    }
  }

  input(name: string, elemType: number, dims: (number | string)[]): string {
    this.inputs.push(valueInfo(name, elemType, dims));
    return name;
  }

  output(name: string, elemType: number, dims: (number | string)[]): void {
    this.outputs.push(valueInfo(name, elemType, dims));
  }

  initializer(t: TensorProto): string {
    this.initializers.push(t);
    return t.name!;
  }

  weight(name: string, data: Float32Array, dims: number[]): string {
    return this.initializer(floatTensor(name, data, dims));
  }

  /** A small constant, named the way torch names them. */
  ints(values: number[], dims: number[] = [values.length]): string {
    return this.initializer(int64Tensor(`${this.constPrefix}${this.constCount++}`, values, dims));
  }

  floats(values: number[], dims: number[] = [values.length]): string {
    return this.weight(`${this.constPrefix}${this.constCount++}`, Float32Array.from(values), dims);
  }

  scalar(value: number): string {
    return this.floats([value], []);
  }

  private uniqueName(opType: string): string {
    const base = `${this.scopes.at(-1) ?? ''}/${opType}`;
    const n = this.used.get(base) ?? 0;
    this.used.set(base, n + 1);
    return n === 0 ? base : `${base}_${n}`;
  }

  /** Adds a node; returns its output names. */
  /** Adds a node; `outputs` names its outputs from the node's own name unless given. */
  private add(opType: string, inputs: string[], attrs: Record<string, AttrValue | AttributeProto>, outputs: (name: string) => string[]): string[] {
    const name = this.uniqueName(opType);
    const output = outputs(name);
    const attribute_ = Object.entries(attrs).map(([k, v]) =>
      typeof v === 'object' && v !== null && 'type' in v && 'name' in v ? (v as AttributeProto) : attribute(k, v as AttrValue),
    );
    this.nodes.push({ name, opType, input: inputs, output, attribute: attribute_ });
    return output;
  }

  nodeN(opType: string, inputs: string[], nOutputs: number, attrs: Record<string, AttrValue | AttributeProto> = {}): string[] {
    return this.add(opType, inputs, attrs, (name) => Array.from({ length: nOutputs }, (_, i) => `${name}_output_${i}`));
  }

  op(opType: string, inputs: string[], attrs: Record<string, AttrValue | AttributeProto> = {}): string {
    return this.nodeN(opType, inputs, 1, attrs)[0];
  }

  /** Adds a node whose output has a fixed name (a graph output). */
  opNamed(opType: string, inputs: string[], output: string, attrs: Record<string, AttrValue | AttributeProto> = {}): string {
    return this.add(opType, inputs, attrs, () => [output])[0];
  }

  /**
   * A subgraph (an If branch) that reads this graph's tensors by name. Its
   * constants get their own prefix: ONNX forbids a subgraph to shadow a name.
   * Its outputs are float unless `elemTypes` says otherwise, output by output.
   */
  subgraph(name: string, scope: string, build: (sub: GraphBuilder) => string[], elemTypes: number[] = []): GraphProto {
    const sub = new GraphBuilder();
    sub.constPrefix = `${this.constPrefix}${name}::`;
    const outputs = sub.scope(scope, () => build(sub));
    sub.outputs.push(...outputs.map((o, i) => ({ name: o, type: { tensorType: { elemType: elemTypes[i] ?? DataType.FLOAT } } })));
    return sub.graph(name);
  }

  graph(name: string): GraphProto {
    return { name, node: this.nodes, initializer: this.initializers, input: this.inputs, output: this.outputs };
  }

  model(name: string, producer = 'deltaserve'): ModelProto {
    return onnx.ModelProto.create({
      irVersion: 8,
      producerName: producer,
      opsetImport: [{ domain: '', version: OPSET }],
      graph: this.graph(name),
    });
  }

  encode(name: string): Uint8Array {
    return encodeModel(this.model(name));
  }
}

export { DataType };
