/**
 * Decode-step cost of several site plans (DELTASERVE_SITES) on demo:gpt2-small
 * (GPT-2 small's exact shapes), CPU provider: what each kind of delta site
 * costs, to choose a plan. One process, every configuration timed round-robin
 * (so drift hits all alike), medians of N.
 *
 *   npx tsx bench/rewrite.ts [--rounds 5] [--steps 8] [--context 64] [--batches 1,8,32]
 *
 * The model is generated into DELTASERVE_CACHE_DIR (or ~/.cache/deltaserve)
 * on first use (~480 MB). The measurement lives in bench/lib/rewrite-step.ts,
 * which `npm run bench` (bench/run.ts) runs too.
 */
import { loadBackbone } from '../src/backbone/backbone.js';
import type { SitePlan } from '../src/deltas/kinds/index.js';
import { benchCacheDir } from './lib/common.js';
import { measureRewrite, rewriteTables } from './lib/rewrite-step.js';

const arg = (name: string, dflt: string) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : dflt;
};

async function main() {
  benchCacheDir();
  const t0 = Date.now();
  const bb = await loadBackbone({ model: 'demo:gpt2-small' });
  console.error(`loaded ${bb.info.name} in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  const plans: Record<string, SitePlan> = {
    'engine, default plan (lora+bias on all 48 linears, adapter on attn.c_proj+mlp.c_proj, ia3 on c_attn+mlp.c_proj)': {},
    'engine, every site on every linear': { lora: 'all', adapter: 'all', bias: 'all', ia3: 'all' },
    'engine, default plan without ia3': { ia3: [] },
    'engine, lora all / no adapter / bias all': { lora: 'all', adapter: [], bias: 'all', ia3: [] },
    'engine, lora all / no adapter / no bias': { lora: 'all', adapter: [], bias: [], ia3: [] },
    'engine, lora c_attn only': { lora: ['c_attn'], adapter: [], bias: [], ia3: [] },
  };
  const res = await measureRewrite(bb, {
    rounds: Number(arg('rounds', '5')),
    perBlock: Number(arg('steps', '8')),
    context: Number(arg('context', '64')),
    batches: arg('batches', '1,8,32').split(',').map(Number),
    plans,
    log: (m) => console.error(m),
  });
  console.log(rewriteTables(res));
  console.log(`\n(LoRA rows hold min(B, K) distinct deltas: at B=1 one LoRA, at B=8 eight.) Total ${((Date.now() - t0) / 1000).toFixed(0)} s.`);
}

await main();
