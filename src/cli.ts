/**
 * The `deltaserve` command: serve, generate, inspect, export, and manage the
 * delta store. Every server flag doubles as its environment variable.
 */
import { readdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { Command, Option } from 'commander';
import { loadBackbone, resolveModelDir } from './backbone/backbone.js';
import type { Bits } from './backbone/quant/matmul-nbits.js';
import { INTEGER_DEFAULTS, quantizeModelDir } from './backbone/quant/quantize-model.js';
import { writeDemoDir } from './backbone/demo/materialize.js';
import { demoSpec } from './backbone/demo/spec.js';
import { engineModelSource } from './backbone/engine-model.js';
import { buildEngineGraph } from './backbone/rewrite/index.js';
import { planSites } from './deltas/kinds/index.js';
import { createSession } from './backbone/session.js';
import { addConfigOptions, ConfigError, loadConfig, type Config } from './config.js';
import { Registry } from './deltas/registry.js';
import { makeDemoDeltas } from './deltas/demo-deltas.js';
import { Engine } from './engine/engine.js';
import { IncrementalDetokenizer } from './engine/detokenizer.js';
import { createLogger } from './log.js';
import { runServer } from './server.js';
import { ServeError } from './errors.js';
import { renderModuleTree } from './backbone/module-tree.js';

const program = new Command('deltaserve')
  .description('One frozen ONNX backbone, many LoRA / adapter / BitFit deltas, batched per row.')
  .showHelpAfterError();

const configFrom = (cmd: Command): Config => loadConfig(process.env, cmd.opts());

addConfigOptions(program.command('serve').description('serve the HTTP API (npm start runs this on the embedded demo)'))
  .action(async (_opts, cmd: Command) => {
    const config = configFrom(cmd);
    await runServer(config, createLogger(config.logLevel));
  });

program.command('generate')
  .description('generate a continuation in-process and print it')
  .requiredOption('--prompt <text>', 'the prompt')
  .addOption(new Option('--model <dir|demo[:family]>', 'backbone').env('DELTASERVE_MODEL').default('demo'))
  .addOption(new Option('--deltas-dir <dir>', 'the delta store').env('DELTASERVE_DELTAS_DIR').default('./deltas'))
  .option('--task <id>', 'run with this task\'s delta')
  .option('--max-new-tokens <n>', 'tokens to generate', '32')
  .option('--temperature <t>', '0 = greedy', '0')
  .option('--top-k <k>', '0 = off', '0')
  .option('--top-p <p>', '1 = off', '1')
  .option('--seed <n>', 'sampling seed')
  .action(async (o) => {
    const backbone = await loadBackbone({ model: o.model });
    let delta = null;
    if (o.task) {
      const registry = await Registry.open({ dir: o.deltasDir, backbone: backbone.info, cacheBytes: 2 ** 30 });
      delta = await registry.load(o.task);
    }
    const graph = buildEngineGraph(backbone, planSites(backbone));
    const engine = new Engine(await createSession(await engineModelSource(backbone, graph.bytes)), backbone.io, graph.sites, {
      maxBatch: 1, prefillChunkTokens: 512, eosTokenIds: backbone.tokenizer.eosTokenIds, maxPositions: backbone.info.maxPositions,
    });
    const promptIds = backbone.tokenizer.encode(o.prompt, { addSpecialTokens: true });
    engine.add({
      rowId: 1, promptIds, delta,
      maxNewTokens: Number(o.maxNewTokens),
      sampling: { temperature: Number(o.temperature), topK: Number(o.topK), topP: Number(o.topP), repetitionPenalty: 1, seed: o.seed ? Number(o.seed) : null },
    });
    const detok = new IncrementalDetokenizer(backbone.tokenizer, { promptIds });
    while (!engine.idle) {
      for (const t of (await engine.step()).tokens) process.stdout.write(detok.push(t.token));
    }
    process.stdout.write(detok.flush() + '\n');
  });

program.command('inspect')
  .description('print the backbone\'s module tree with the delta sites of each module, or with the sites of one task\'s delta')
  .addOption(new Option('--model <dir|demo[:family]>', 'backbone').env('DELTASERVE_MODEL').default('demo'))
  .addOption(new Option('--deltas-dir <dir>', 'the delta store (with --task)').env('DELTASERVE_DELTAS_DIR').default('./deltas'))
  .addOption(new Option('--sites <plan>', 'the site plan (DELTASERVE_SITES)').env('DELTASERVE_SITES'))
  .option('--task <id>', 'show where this task\'s delta attaches: its kind, and each site\'s shapes')
  .option('--json', 'print GET /v1/backbone\'s JSON (with --task, GET /v1/deltas/{id}\'s) instead of a tree')
  .action(async (o) => {
    const backbone = await loadBackbone({ model: o.model });
    if (o.task) {
      const registry = await Registry.open({ dir: o.deltasDir, backbone: backbone.info, cacheBytes: 2 ** 30 });
      const record = await registry.get(o.task);
      if (!record) throw new ServeError(404, 'delta_not_found', `no delta '${o.task}' in ${o.deltasDir}`);
      if (o.json) return console.log(JSON.stringify(record, null, 2));
      const notes = new Map(record.sites.map((s) => [s.module, `${s.kind} on the ${s.site} site: ${s.shapes.map((d) => `[${d.join(', ')}]`).join(' ')}`]));
      return console.log(renderModuleTree(backbone.info, notes, `\n${record.id}: ${record.type} (${record.format}), rank ${record.rank}, ${record.sites.length} sites, ${record.bytes} bytes`));
    }
    if (o.json) {
      const { name, family, fingerprint, modules, defaultTargets } = backbone.info;
      return console.log(JSON.stringify({ name, family, fingerprint, modules, defaultTargets }, null, 2));
    }
    const plan = planSites(backbone, loadConfig({ DELTASERVE_SITES: o.sites }).sites);
    console.log(renderModuleTree(backbone.info, new Map([...plan].map(([m, sites]) => [m, `sites: ${sites.map((s) => s.name).join(', ')}`]))));
    // The same rewrite `serve` runs: a graph it cannot serve fails here, naming the node.
    const graph = buildEngineGraph(backbone, plan);
    console.log(`\nKV cache: attention on ${graph.splitLayers} of ${graph.kvPaths.length} layers reads past and new without a Concat`);
    for (const l of graph.kvPaths) console.log(`  layer ${l.layer}: ${l.path === 'split' ? 'split' : 'concat (fallback)'} — ${l.reason}`);
  });

program.command('export')
  .description('write an embedded backbone as a model directory in Optimum\'s layout')
  .requiredOption('--model <demo:family>', 'demo, demo:llama, demo:gpt2 or demo:gpt2-small')
  .requiredOption('--out <dir>', 'output directory')
  .option('--tokenizer <tokenizer.json>', 'a real tokenizer.json (demo:gpt2-small)')
  .action(async (o) => {
    const spec = demoSpec(o.model);
    if (!spec) throw new Error(`--model must be an embedded backbone (demo, demo:llama, demo:gpt2, demo:gpt2-small), got ${o.model}`);
    await writeDemoDir(spec, resolve(o.out), o.tokenizer);
    console.log(`wrote ${spec.name} to ${resolve(o.out)}: ${(await readdir(o.out)).join(', ')}`);
  });

program.command('quantize')
  .description('write a quantized copy of a float model directory: every linear but lm_head as onnxruntime\'s MatMulNBits (round-to-nearest per block), ' +
    'or with --format integer as MatMulInteger behind DynamicQuantizeLinear (onnxruntime quantize_dynamic\'s layout); embeddings stay float')
  .addOption(new Option('--bits <n>', 'bits per weight').choices(['4', '8']).makeOptionMandatory())
  .addOption(new Option('--format <f>', 'nbits: MatMulNBits, float activations; integer: 8-bit MatMulInteger, activations quantized at run time').choices(['nbits', 'integer']).default('nbits'))
  .addOption(new Option('--block <n>', 'nbits: weights per block along the input features (one scale and zero point each)').choices(['32', '64', '128']).default('32'))
  .requiredOption('--model <dir|demo:family>', 'the float model directory (Optimum layout), or an embedded backbone')
  .requiredOption('--out <dir>', 'output directory (the same layout: serve it with DELTASERVE_MODEL)')
  .option('--include-lm-head', 'quantize lm_head too')
  .addOption(new Option('--accuracy-level <n>', 'nbits: MatMulNBits accuracy_level: 0 float32 compute, 4 int8 activations').choices(['0', '1', '2', '3', '4']).default('0'))
  .addOption(new Option('--weight-type <t>', 'integer: int8 (symmetric) or uint8 weights').choices(['int8', 'uint8']).default(INTEGER_DEFAULTS.weightType))
  .option('--per-tensor', 'integer: one scale per weight instead of one per output feature')
  .option('--full-range', 'integer: all 8 bits (onnxruntime\'s reduce_range off; on by default, as onnx-community converts)')
  .action(async (o) => {
    const { dir } = await resolveModelDir({ model: o.model });
    const integer = o.format === 'integer';
    if (integer && o.bits !== '8') throw new Error(`--format integer is 8-bit only (MatMulInteger): use --bits 8, or --format nbits for ${o.bits}-bit`);
    const report = await quantizeModelDir(dir, resolve(o.out), {
      format: o.format, bits: Number(o.bits) as Bits, blockSize: Number(o.block), includeLmHead: !!o.includeLmHead, accuracyLevel: Number(o.accuracyLevel),
      integer: { weightType: o.weightType, perChannel: !o.perTensor, reduceRange: !o.fullRange },
    });
    const mb = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;
    const as = integer ? `8-bit MatMulInteger (${o.weightType} weights ${o.perTensor ? 'per tensor' : 'per channel'}, dynamic activations)` : `${o.bits}-bit blocks of ${o.block}`;
    console.log(`quantized ${report.quantized.length} linear modules to ${as}: ${mb(report.floatBytes)} of float32 weights -> ${mb(report.quantizedBytes)}`);
    for (const s of report.skipped) console.log(`  left float: ${s.module} (${s.reason})`);
    console.log(`wrote ${resolve(o.out)}: ${(await readdir(o.out)).join(', ')}`);
  });

const deltas = program.command('deltas').description('manage the delta store directly (running servers see changes on their next miss)');
const storeOptions = (cmd: Command) => cmd
  .addOption(new Option('--model <dir|demo[:family]>', 'backbone the deltas are validated against').env('DELTASERVE_MODEL').default('demo'))
  .addOption(new Option('--deltas-dir <dir>', 'the delta store').env('DELTASERVE_DELTAS_DIR').default('./deltas'));
const openRegistry = async (o: { model: string; deltasDir: string }) => {
  const backbone = await loadBackbone({ model: o.model });
  return Registry.open({ dir: o.deltasDir, backbone: backbone.info, cacheBytes: 2 ** 30 });
};

storeOptions(deltas.command('add'))
  .description('validate and register a delta folder (PEFT or OpenDelta)')
  .argument('<id>', 'task id')
  .argument('<dir>', 'folder holding the delta\'s files')
  .option('--replace', 'replace an existing delta')
  .action(async (id: string, dir: string, o) => {
    const registry = await openRegistry(o);
    const files = (await readdir(dir, { withFileTypes: true })).filter((e) => e.isFile()).map((e) => ({ name: e.name, path: join(dir, e.name) }));
    console.log(JSON.stringify(await registry.register(id, files, { replace: !!o.replace }), null, 2));
  });

storeOptions(deltas.command('list')).description('list registered deltas').action(async (o) => {
  const registry = await openRegistry(o);
  for (const d of await registry.list()) console.log(`${d.id}\t${d.type}\t${d.format}\trank ${d.rank}\t${d.sites.length} sites\t${d.bytes} bytes`);
});

storeOptions(deltas.command('make-demo'))
  .description('(re)write the demo deltas (a PEFT LoRA, an OpenDelta adapter, an OpenDelta BitFit) for the backbone')
  .action(async (o) => {
    const backbone = await loadBackbone({ model: o.model });
    for (const d of await makeDemoDeltas(backbone.info, o.deltasDir)) console.log(`${d.id}\t${d.type}\t${d.format}\t${d.sites.length} sites`);
  });

storeOptions(deltas.command('rm')).description('remove a delta').argument('<id>', 'task id').action(async (id: string, o) => {
  await (await openRegistry(o)).remove(id);
  console.log(`removed ${id}`);
});

try {
  await program.parseAsync(process.argv);
} catch (e) {
  if (e instanceof ConfigError || e instanceof ServeError) {
    console.error(`deltaserve: ${e.message}${e instanceof ServeError && e.details?.length ? '\n  ' + e.details.join('\n  ') : ''}`);
  } else {
    console.error(`deltaserve: ${(e as Error).message}`);
  }
  process.exit(1);
}
