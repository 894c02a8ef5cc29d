/**
 * The backbone's modules as a tree, each linear with a note (the delta sites
 * it carries, or what a delta puts there): what OpenDelta's `delta.log()`
 * shows, for a whole ONNX model.
 */
import type { BackboneInfo, Quantization } from './types.js';

interface TreeNode {
  children: Map<string, TreeNode>;
  label?: string;
}

/** `MatMulNBits 4-bit, block 32`; `MatMulInteger 8-bit, dynamic activations, int8 weights per channel`. */
export function describeQuantization(q: Quantization): string {
  if (q.format === 'MatMulNBits') return `MatMulNBits ${q.bits}-bit, block ${q.blockSize}`;
  return `MatMulInteger ${q.bits}-bit, dynamic activations, ${q.weightType} weights ${q.perChannel ? 'per channel' : 'per tensor'}`;
}

export function renderModuleTree(info: BackboneInfo, notes: ReadonlyMap<string, string>, title = ''): string {
  const root: TreeNode = { children: new Map() };
  for (const m of info.modules) {
    // `layers.0` stays one segment, as torch scopes it.
    const parts = m.name.split('.').reduce<string[]>((acc, p) => {
      if (/^\d+$/.test(p) && acc.length) acc[acc.length - 1] += '.' + p;
      else acc.push(p);
      return acc;
    }, []);
    let node = root;
    for (const p of parts) {
      if (!node.children.has(p)) node.children.set(p, { children: new Map() });
      node = node.children.get(p)!;
    }
    const note = notes.get(m.name);
    const q = m.quantization ? ` ${describeQuantization(m.quantization)}` : '';
    node.label = `Linear ${m.inFeatures}→${m.outFeatures}${q}${note ? `  [${note}]` : ''}`;
  }
  const quantized = info.modules.filter((m) => m.quantization).length;
  const lines = [`${info.name} (${info.family}, ${info.modules.length} linear modules${quantized ? `, ${quantized} quantized` : ''}, fingerprint ${info.fingerprint.slice(0, 12)})${title}`];
  const walk = (node: TreeNode, prefix: string) => {
    const entries = [...node.children];
    entries.forEach(([name, child], i) => {
      const last = i === entries.length - 1;
      lines.push(`${prefix}${last ? '└── ' : '├── '}${name}${child.label ? ` — ${child.label}` : ''}`);
      walk(child, prefix + (last ? '    ' : '│   '));
    });
  };
  walk(root, '');
  return lines.join('\n');
}
