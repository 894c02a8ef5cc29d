/**
 * Quantized real torch exports (test/fixtures/torch: GPT-2, Llama with GQA,
 * Qwen2-style with q/k/v biases): each quantized as `deltaserve quantize` does
 * (4-bit blocks of 32, and 8-bit), served with its real PEFT LoRA through the
 * real stack; the greedy ids, alone and in one mixed batch, equal those of a
 * float reference whose weights are the plainly dequantized ones with the
 * LoRA merged in (test/helpers/quant-reference.ts).
 */
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { readModel } from '../src/backbone/onnx/proto.js';
import { quantizeModelDir } from '../src/backbone/quant/quantize-model.js';
import { createSession } from '../src/backbone/session.js';
import { fullForwardGreedy } from './helpers/engine-graph.js';
import { generate, params, startStack, type Stack } from './helpers/engine-stack.js';
import { torchFixtures } from './helpers/fixtures.js';
import { dequantizedModel, peftLoraFactors } from './helpers/quant-reference.js';

for (const f of torchFixtures()) {
  for (const bits of [4, 8] as const) {
    describe(`torch export ${f.name}, ${bits}-bit`, () => {
      let out: string;
      let stack: Stack;

      before(async () => {
        out = await mkdtemp(join(tmpdir(), `ds-quant-${f.name}-`));
        // In-process (quantize.test.ts runs the command itself).
        await quantizeModelDir(f.dir, out, { bits, blockSize: 32 });
        stack = await startStack(out);
        const files = (await readdir(f.loraDir)).map((name) => ({ name, path: join(f.loraDir, name) }));
        await stack.services.registry.register('lora', files, { replace: false });
      });
      after(async () => {
        await stack?.close();
        await rm(out, { recursive: true, force: true });
      });

      test('every linear but lm_head is served quantized', () => {
        const mods = stack.services.backbone.info.modules;
        assert.ok(mods.length > 1);
        for (const m of mods) assert.equal(m.quantization?.bits, m.name === 'lm_head' ? undefined : bits, m.name);
      });

      test('greedy ids, alone and in one mixed batch, equal the dequantized reference with the PEFT LoRA merged', async () => {
        const { backbone } = stack.services;
        const qmodel = readModel(join(out, 'model.onnx'));
        const refs = { bare: await createSession(dequantizedModel(qmodel)), lora: await createSession(dequantizedModel(qmodel, peftLoraFactors(f.loraDir))) };
        const p = params({ maxNewTokens: f.maxNewTokens });
        const reqs = f.prompts.flatMap((pr) => [{ task: 'lora', text: pr.text }, { task: null, text: pr.text }]);
        const alone: number[][] = [];
        for (const r of reqs) alone.push((await generate(stack.services, r.task, r.text, p)).tokens);
        const together = (await Promise.all(reqs.map((r) => generate(stack.services, r.task, r.text, p)))).map((x) => x.tokens);
        let unlikeTorch = 0;
        for (const [i, r] of reqs.entries()) {
          const ids = backbone.tokenizer.encode(r.text, { addSpecialTokens: true });
          const want = await fullForwardGreedy(r.task ? refs.lora : refs.bare, backbone.io, ids, alone[i]);
          assert.deepEqual(alone[i], want, `${r.text} (${r.task ?? 'bare'}) alone`);
          assert.deepEqual(together[i], want, `${r.text} (${r.task ?? 'bare'}) in the mixed batch`);
          const torch = f.prompts.find((pr) => pr.text === r.text)![r.task ? 'lora' : 'bare'];
          if (torch.slice(0, alone[i].length).join() !== alone[i].join()) unlikeTorch++;
        }
        assert.ok(reqs.some((r, i) => r.task && alone[i].join() !== alone[i + 1].join()), 'the LoRA never changed the ids');
        console.log(`# ${f.name} ${bits}-bit: ${reqs.length} runs equal the dequantized reference; ${unlikeTorch} differ from PyTorch's float32 ids (the quantization's own error)`);
      });
    });
  }
}
