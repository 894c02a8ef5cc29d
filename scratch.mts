import { mkdtemp } from 'node:fs/promises'; import { tmpdir } from 'node:os'; import { join } from 'node:path';
import { fuzzUploads } from './test/reliability/uploads.js';
const t = performance.now();
const r = await fuzzUploads({ cases: 200, seed: 1, dir: await mkdtemp(join(tmpdir(), 'rel-')) });
console.log(performance.now() - t, { ...r, failures: r.failures.slice(0, 10) });
