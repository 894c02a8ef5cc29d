/**
 * Parallel adapter (OpenDelta `parallel_adapter`, He et al. 2022): a
 * bottleneck that reads a module's input and adds to its output,
 * y' = y + scaled · up(act(down(x))). Served through the adapter site's
 * input path, `scaled` folded into the up-projection.
 *
 * OpenDelta names it `<module>.parallel_adapter.modulelist.{down_proj,up_proj}.{weight,bias}`.
 * Its paired form (from one module's input to another's output) is not
 * served: each linear's sites see that linear only, and the down-projection's
 * width then does not match the module's input.
 */
import { z } from 'zod';
import { OPENDELTA_CONFIG } from '../formats/files.js';
import { activationOf, adapterSite, linearPairRows, modulelistKey, type Activation } from './adapter.js';
import { readSchema } from '../problems.js';
import { defineKind } from './kind.js';

// OpenDelta's ParallelAdapterConfig defaults.
const Settings = z.looseObject({
  bottleneck_dim: z.number().int().positive().default(24),
  non_linearity: z.string().default('gelu_new'),
  scaled: z.number().default(1),
});

interface ParallelSettings {
  bottleneck: number;
  activation: Activation;
  scale: number;
}

export const parallelAdapter = defineKind<ParallelSettings>({
  type: 'parallel_adapter',
  site: adapterSite,
  opendelta: {
    name: 'parallel_adapter',
    settings(config, problems) {
      const cfg = readSchema(Settings, config, OPENDELTA_CONFIG, problems);
      return cfg && { bottleneck: cfg.bottleneck_dim, scale: cfg.scaled, activation: activationOf(cfg.non_linearity, problems) };
    },
    key: modulelistKey('parallel_adapter'),
    expected: '<module>.parallel_adapter.modulelist.down_proj.weight/.bias and up_proj.weight/.bias',
  },
  build: (parts, at) => linearPairRows(parts, at, { reads: 'input', ...at.settings }),
});
