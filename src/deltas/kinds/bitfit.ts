/**
 * BitFit: tuned biases, served as y + (b_tuned − b_backbone) on a module's
 * output, and the bias graph site (one Add of a [rows, 1, out] bank).
 *
 * OpenDelta (`bitfit`) saves the tuned bias itself, `<module>.bias`; an entry
 * of modified_modules naming a block tunes every linear inside it. A bias
 * OpenDelta adds to a module without one of its own (a layer norm) is saved
 * as `<module>.bitfit.bias` and refused: only linear modules have sites.
 */
import type { GraphSite } from '../../backbone/rewrite/delta-sites.js';
import { defineKind, expectShape } from './kind.js';

export const biasSite: GraphSite = {
  name: 'bias',
  banks: [{ key: 'bias', dims: (m) => [1, m.outFeatures], neutral: 0 }],
  defaultModules: () => 'all',
  output: ({ g, y, bank }) => g.op('Add', [y, bank('bias')]),
};

export const bitfit = defineKind<object>({
  type: 'bitfit',
  site: biasSite,
  opendelta: {
    name: 'bitfit',
    settings: () => ({}),
    key(name) {
      const m = /^(.+)\.bias$/.exec(name);
      if (!m) return null;
      if (m[1].endsWith('.bitfit')) {
        return { refused: `tensor '${name}' is a BitFit bias on a non-linear module (a layer norm or head); deltaserve applies BitFit to linear modules only` };
      }
      return { module: m[1], part: 'bias' };
    },
    expected: '<module>.bias',
    broadcastTargets: true,
  },
  build(parts, at) {
    const tuned = parts.get('bias')!;
    const out = at.module.outFeatures;
    if (!expectShape(at, 'bias', tuned, [out])) return null;
    const own = at.backbone.biasOf(at.module.name);
    if (own && own.length !== out) {
      at.problems.invalid(`module '${at.module.name}': the backbone's bias has ${own.length} values but the module has ${out} outputs`);
      return null;
    }
    // slice() also detaches the result from the file buffer a zero-copy read points into.
    const bias = tuned.data.slice();
    if (own) for (let i = 0; i < out; i++) bias[i] -= own[i];
    return { rank: 0, data: { bias } };
  },
});
