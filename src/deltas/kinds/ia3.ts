/**
 * (IA)³: learned vectors that rescale a module's activations, served as a
 * per-row scale site: x ⊙ l_in before the module's MatMul for feed-forward
 * modules, (x·W + b) ⊙ l_out after it for the others, as PEFT's IA3 layer
 * computes them (PEFT merges the same: W's rows or columns times l, and the
 * bias times l on output-scaled modules).
 *
 * PEFT (`peft_type` IA3): `target_modules`, `feedforward_modules`, and per
 * module `<module>.ia3_l`, [1, in] on a feed-forward module, [out, 1]
 * otherwise. The shape says which; the config must agree.
 */
import { z } from 'zod';
import type { GraphSite } from '../../backbone/rewrite/delta-sites.js';
import { PEFT_CONFIG } from '../formats/files.js';
import { compileRegex } from '../names.js';
import { readSchema } from '../problems.js';
import { defineKind } from './kind.js';

export const ia3Site: GraphSite = {
  name: 'ia3',
  banks: [
    { key: 'ia3_in', dims: (m) => [1, m.inFeatures], neutral: 1 },
    { key: 'ia3_out', dims: (m) => [1, m.outFeatures], neutral: 1 },
  ],
  // An unused scale site still multiplies by ones: only where PEFT puts IA3 by default.
  defaultModules: (info) => info.defaultTargets.ia3 ?? 'all',
  input: ({ g, x, bank }) => g.op('Mul', [x, bank('ia3_in')]),
  output: ({ g, y, bank }) => g.op('Mul', [y, bank('ia3_out')]),
};

const nameList = z.union([z.string(), z.array(z.string())]).nullish();
const Settings = z.looseObject({ feedforward_modules: nameList });

/** Whether the config calls a module feed-forward (null: it does not say). */
type Ia3Settings = (module: string) => boolean | null;

export const ia3 = defineKind<Ia3Settings>({
  type: 'ia3',
  site: ia3Site,
  peft: {
    name: 'IA3',
    settings(config, problems) {
      const cfg = readSchema(Settings, config, PEFT_CONFIG, problems);
      if (!cfg) return null;
      const ff = cfg.feedforward_modules;
      if (ff == null) return () => null;
      // PEFT's `_check_target_module_feedforward`: a string is a full-match regex, a list entry a plain suffix.
      if (typeof ff !== 'string') return (m) => ff.some((suffix) => m.endsWith(suffix));
      const re = compileRegex(ff, true);
      if (typeof re === 'string') {
        problems.invalid(`feedforward_modules: ${re}`);
        return null;
      }
      return (m) => re.test(m);
    },
    key(name) {
      const m = /^(.+)\.ia3_l$/.exec(name);
      return m ? { module: m[1], part: 'ia3_l' } : null;
    },
    expected: '<module>.ia3_l',
  },
  build(parts, at) {
    const l = parts.get('ia3_l')!;
    const { inFeatures: inF, outFeatures: out } = at.module;
    const [a, b] = l.shape;
    const feedforward = l.shape.length === 2 && a === 1 && b === inF ? true : l.shape.length === 2 && a === out && b === 1 ? false : null;
    if (feedforward === null) {
      at.problems.invalid(
        `module '${at.module.name}' (in ${inF}, out ${out}): ia3_l '${l.name}' is [${l.shape.join(', ')}], expected [1, ${inF}] ` +
        `(a feed-forward module: scales its input) or [${out}, 1] (scales its output)`,
      );
      return null;
    }
    const said = at.settings(at.name);
    if (said !== null && said !== feedforward) {
      at.problems.invalid(
        `module '${at.name}': ia3_l is [${l.shape.join(', ')}], which scales its ${feedforward ? 'input' : 'output'}, ` +
        `but feedforward_modules ${feedforward ? 'does not name' : 'names'} it`,
      );
      return null;
    }
    return { rank: 0, data: { [feedforward ? 'ia3_in' : 'ia3_out']: l.data.slice() } };
  },
});
