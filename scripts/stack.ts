/**
 * npm run stack [-- --replicas 2 --model demo:gpt2 --dir .stack]: starts the
 * local multi-replica stack (scripts/lib/local-stack.ts) in the background and
 * returns once every part answers. npm run stack:down stops it.
 * The environment (DELTASERVE_MAX_BATCH, DELTASERVE_CACHE_DIR, …) reaches every replica.
 */
import { Command } from 'commander';
import { readState, startLocalStack, stopLocalStack } from './lib/local-stack.js';

const program = new Command('stack').description('two deltaserve replicas behind nginx (routing by task), scraped by Prometheus');

program.command('up', { isDefault: true })
  .option('--dir <dir>', 'state, logs, configs and the shared store', '.stack')
  .option('--replicas <n>', 'deltaserve replicas', '2')
  .option('--model <model>', 'DELTASERVE_MODEL of every replica', process.env.DELTASERVE_MODEL ?? 'demo')
  .option('--deltas-dir <dir>', 'the shared store (default <dir>/deltas; seeded with ./deltas for the demo model)')
  .option('--scrape-interval <duration>', "Prometheus' scrape and evaluation interval", '5s')
  .option('--alert-for <duration>', "replace every alert's for: (the expressions stay), to see alerts fire in a demo or a test")
  .action(async (o: { dir: string; replicas: string; model: string; deltasDir?: string; scrapeInterval: string; alertFor?: string }) => {
    const s = await startLocalStack({
      dir: o.dir, replicas: Number(o.replicas), model: o.model, deltasDir: o.deltasDir, scrapeInterval: o.scrapeInterval, alertFor: o.alertFor,
    });
    console.log([
      `deltaserve stack up (${s.backbone}, ${s.replicas.length} replicas, store ${s.deltasDir})`,
      `  nginx       ${s.url}   (routes by task: the JSON body, or the X-Deltaserve-Task header)`,
      ...s.replicas.map((r, i) => `  replica ${i}   ${r.url}   pid ${r.pid}`),
      `  prometheus  ${s.prometheusUrl}`,
      `  logs, configs and pids in ${s.dir}; stop with: npm run stack:down`,
      '',
      `  curl -s ${s.url}/v1/generate -H 'content-type: application/json' -d '{"task": "demo-lora", "inputs": "Hello"}'`,
    ].join('\n'));
  });

program.command('down')
  .option('--dir <dir>', 'the folder the stack was started with', '.stack')
  .action(async (o: { dir: string }) => {
    if (!readState(o.dir)) {
      console.log(`no stack recorded in ${o.dir}`);
      return;
    }
    const stopped = await stopLocalStack(o.dir);
    console.log(stopped.length ? `stopped ${stopped.join(', ')}` : 'nothing was running');
  });

program.parseAsync().catch((err: Error) => {
  console.error(`stack: ${err.message}`);
  process.exit(1);
});
