/**
 * The peer a user would otherwise pick (issue 14, item 2): transformers.js
 * (@huggingface/transformers) on the same exported demo:gpt2-small folder,
 * local files only, greedy. First its greedy token ids must equal ours on the
 * bare backbone (an independent consumer of the same graph); then tokens/s at
 * 1 stream, 16 concurrent callers and its batched call, against deltaserve
 * over HTTP at 1 and 16 streams, and 16 streams over 16 distinct LoRAs.
 */
import { mkdir, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { demoModelDir } from '../../src/backbone/demo/materialize.js';
import { demoSpec } from '../../src/backbone/demo/spec.js';
import { fmt, mdTable, median } from '../lib/common.js';
import { closedLoop, stats } from '../lib/load.js';
import { check, type BenchContext, type BenchSection, type SectionResult } from '../lib/runner.js';
import { backboneModules, makeScratch, peftLora, startServer, uploadDelta, type ServerProcess } from '../lib/server-process.js';
import { yes } from './goals.js';
import { LORA_RANK, loraId, references, requestsOver, SLO, verify } from './http.js';

const PROMPT_SET = requestsOver([null], 16, 1).map((r) => r.prompt);

export const section: BenchSection = {
  name: 'peer',
  async run(ctx: BenchContext) {
    const q = ctx.quick;
    const maxNew = ctx.flags.num('max-new', q ? 16 : 32);
    const rounds = q ? 1 : 3;
    const scratch = await makeScratch('peer');
    ctx.onRelease(() => scratch.remove(), 'end');
    // transformers.js reads <localModelPath>/<id>/{config.json, tokenizer.json, …, onnx/model.onnx}: the export, linked into that layout.
    const src = await demoModelDir(demoSpec(ctx.model)!, { cacheDir: ctx.cacheDir });
    const localId = ctx.model.replace(':', '-');
    const modelDir = join(scratch.dir, 'models', localId);
    await mkdir(join(modelDir, 'onnx'), { recursive: true });
    for (const f of ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json']) await symlink(join(src, f), join(modelDir, f));
    await symlink(join(src, 'model.onnx'), join(modelDir, 'onnx', 'model.onnx'));

    const tf = await import('@huggingface/transformers');
    tf.env.allowRemoteModels = false;
    tf.env.localModelPath = join(scratch.dir, 'models');
    const tokenizer = await tf.AutoTokenizer.from_pretrained(localId);
    const model = await tf.AutoModelForCausalLM.from_pretrained(localId, { dtype: 'fp32', device: 'cpu' });
    ctx.onRelease(async () => {
      await model.dispose();
    });
    const peerGenerate = async (prompts: string[]): Promise<number[][]> => {
      tokenizer.padding_side = 'left';
      const inputs = tokenizer(prompts, { padding: true });
      const out = await model.generate({ ...inputs, max_new_tokens: maxNew, min_new_tokens: maxNew, do_sample: false }) as { tolist(): bigint[][] };
      const width = (inputs.input_ids as { dims: number[] }).dims[1];
      return out.tolist().map((row) => row.slice(width).map(Number));
    };

    const server = await startServer({ model: ctx.model, deltasDir: join(scratch.dir, 'deltas'), cacheDir: ctx.cacheDir });
    try {
      return await compare(ctx, server, peerGenerate, maxNew, rounds, (tf.env as { version?: string }).version ?? '?');
    } finally {
      await server.stop();
    }
  },
};

async function compare(
  ctx: BenchContext, server: ServerProcess, peerGenerate: (prompts: string[]) => Promise<number[][]>, maxNew: number, rounds: number, tfVersion: string,
): Promise<SectionResult> {
  const client = server.client;
  const modules = await backboneModules(client);
  for (let k = 0; k < 16; k++) await uploadDelta(server.url, loraId(k), peftLora(modules, k, LORA_RANK));

  // Greedy ids must agree on the bare backbone, prompt by prompt.
  const bare = requestsOver([null], 16, maxNew);
  const reference = new Map<string, number[]>();
  await references(client, bare, reference);
  for (const r of bare.slice(0, 8)) {
    const [ids] = await peerGenerate([r.prompt]);
    const ours = reference.get(r.key)!;
    check(ids.length === ours.length && ids.every((x, i) => x === ours[i]),
      `peer: transformers.js's greedy ids differ from deltaserve's on the bare backbone for "${r.prompt}": ${JSON.stringify(ids.slice(0, 8))}… vs ${JSON.stringify(ours.slice(0, 8))}…`);
  }
  ctx.log('peer: transformers.js greedy ids equal deltaserve\'s on 8 prompts (bare backbone)');
  const loras = requestsOver(Array.from({ length: 16 }, (_, k) => loraId(k)), 16, maxNew);
  await references(client, loras, reference);

  const peer = { one: [] as number[], concurrent: [] as number[], batched: [] as number[] };
  const ours = { one: [] as number[], concurrent: [] as number[], loras: [] as number[] };
  for (let r = 0; r < rounds; r++) {
    // One stream, each side: 4 requests one after another.
    let t = performance.now();
    let tokens = 0;
    for (const p of PROMPT_SET.slice(0, 4)) tokens += (await peerGenerate([p]))[0].length;
    peer.one.push(tokens / ((performance.now() - t) / 1000));
    ours.one.push(stats(verify(await closedLoop(client, 'one stream', bare.slice(0, 4), 1), reference), SLO).tokensPerS);
    // 16 concurrent callers.
    t = performance.now();
    const all = await Promise.all(PROMPT_SET.map((p) => peerGenerate([p])));
    peer.concurrent.push(all.reduce((n, x) => n + x[0].length, 0) / ((performance.now() - t) / 1000));
    ours.concurrent.push(stats(verify(await closedLoop(client, '16 streams', bare, 16), reference), SLO).tokensPerS);
    // Its batched call: one generate over 16 prompts, left-padded.
    t = performance.now();
    const batched = await peerGenerate(PROMPT_SET);
    peer.batched.push(batched.reduce((n, x) => n + x.length, 0) / ((performance.now() - t) / 1000));
    ours.loras.push(stats(verify(await closedLoop(client, '16 streams, 16 LoRAs', loras, 16), reference), SLO).tokensPerS);
    ctx.log(`peer round ${r + 1}: transformers.js ${fmt(peer.one.at(-1)!)} / ${fmt(peer.concurrent.at(-1)!)} / batched ${fmt(peer.batched.at(-1)!)} tok/s; deltaserve ${fmt(ours.one.at(-1)!)} / ${fmt(ours.concurrent.at(-1)!)} / 16 LoRAs ${fmt(ours.loras.at(-1)!)}`);
  }
  const r1 = median(ours.one) / median(peer.one);
  const r16 = median(ours.concurrent) / Math.max(median(peer.concurrent), median(peer.batched));
  return {
    goals: [
      { what: 'Peer: deltaserve ≥ 1.0× transformers.js at 1 stream (issue 14)', measured: `${fmt(median(ours.one))} vs ${fmt(median(peer.one))} tokens/s = ${fmt(r1, 2)}×`, met: yes(r1 >= 1) },
      {
        what: 'Peer: deltaserve ≥ 4× transformers.js at 16 concurrent (its better of 16 callers and one batched call) (issue 14)',
        measured: `${fmt(median(ours.concurrent))} vs ${fmt(Math.max(median(peer.concurrent), median(peer.batched)))} tokens/s = ${fmt(r16, 2)}×`,
        met: yes(r16 >= 4),
      },
    ],
    outputs: [{
      title: '13. The peer: transformers.js on the same exported backbone (issue 14)',
      body: [
        `@huggingface/transformers ${tfVersion} (onnxruntime-node underneath, CPU, fp32) loading the exported ${ctx.model} folder from local files only (\`env.allowRemoteModels = false\`), greedy, ${maxNew} new tokens; ` +
        'deltaserve as a separate server process over HTTP (streamed /v1/generate). Before timing, transformers.js\'s greedy ids were checked equal to deltaserve\'s on 8 prompts of the bare backbone, ' +
        'and every deltaserve output equals the same request alone. transformers.js runs in the bench process; its "16 concurrent callers" are 16 concurrent `generate` calls, its batched call one `generate` over 16 left-padded prompts. ' +
        'transformers.js cannot apply 16 different LoRAs without 16 models; deltaserve\'s 16 streams over 16 distinct rank-16 LoRAs are shown beside it. The machine was shared and busy while this ran.',
        mdTable(['tokens/s (median)', 'transformers.js', 'deltaserve', 'deltaserve ÷ transformers.js'], [
          ['1 stream', fmt(median(peer.one)), fmt(median(ours.one)), fmt(r1, 2)],
          ['16 concurrent callers', fmt(median(peer.concurrent)), fmt(median(ours.concurrent)), fmt(median(ours.concurrent) / median(peer.concurrent), 2)],
          ['transformers.js batched call (16 prompts)', fmt(median(peer.batched)), '—', fmt(median(ours.concurrent) / median(peer.batched), 2)],
          ['deltaserve: 16 streams over 16 distinct LoRAs', 'cannot (one model per LoRA)', fmt(median(ours.loras)), '—'],
        ]),
      ].join('\n\n'),
    }],
  };
}
