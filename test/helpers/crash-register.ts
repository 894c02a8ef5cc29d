/**
 * Child process for the crash test: registers a delta and, at the requested
 * write step, says PAUSED and waits to be SIGKILLed by the parent.
 * argv: storeDir deltaDir id replace(0|1) step|none
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { Registry } from '../../src/deltas/registry.js';
import { gpt2Like } from './backbone-info.js';

const [storeDir, deltaDir, id, replace, step] = process.argv.slice(2);
const registry = await Registry.open({
  dir: storeDir,
  backbone: gpt2Like(2, 16),
  cacheBytes: 1 << 20,
  store: {
    onStep: async (at) => {
      if (at !== step) return;
      process.stdout.write('PAUSED\n');
      setInterval(() => {}, 1000);
      await new Promise(() => {});
    },
  },
});
const files = (await readdir(deltaDir)).map((name) => ({ name, path: join(deltaDir, name) }));
await registry.register(id, files, { replace: replace === '1' });
process.stdout.write('DONE\n');
