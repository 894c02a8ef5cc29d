/**
 * Quantized real torch exports (test/fixtures/torch: GPT-2, Llama with GQA,
 * Qwen2-style with q/k/v biases): each quantized as `deltaserve quantize` does
 * (4-bit blocks of 32, and 8-bit MatMulNBits), served with its real PEFT LoRA
 * through the real stack; the greedy ids, alone and in one mixed batch, equal
 * those of a float reference whose weights are the plainly dequantized ones
 * with the LoRA merged in (test/helpers/quant-reference.ts). And each in
 * onnx-community's `model_quantized.onnx` layout (`--format integer
 * --include-lm-head`: onnxruntime quantize_dynamic's MatMulInteger behind
 * DynamicQuantizeLinear, lm_head included): the ids, alone and in the mixed
 * batch, equal those of the reference that keeps the model's
 * DynamicQuantizeLinear, run on the request alone with its KV cache (the
 * engine quantizes activations per row: rewrite/row-quantize.ts).
 */
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { readModel } from '../src/backbone/onnx/proto.js';
import { quantizeModelDir, type QuantizeOptions } from '../src/backbone/quant/quantize-model.js';
import { createSession } from '../src/backbone/session.js';
import { fullForwardGreedy, incrementalGreedy } from './helpers/engine-graph.js';
import { generate, params, startStack, type Stack } from './helpers/engine-stack.js';
import { torchFixtures } from './helpers/fixtures.js';
import { dequantizedIntegerModel, dequantizedModel, peftLoraFactors } from './helpers/quant-reference.js';

const VARIANTS: { label: string; opts: QuantizeOptions }[] = [
  { label: '4-bit', opts: { bits: 4, blockSize: 32 } },
  { label: '8-bit', opts: { bits: 8, blockSize: 32 } },
  { label: '8-bit MatMulInteger, lm_head too (onnx-community\'s model_quantized.onnx)', opts: { format: 'integer', bits: 8, blockSize: 32, includeLmHead: true } },
];

// gpt2-fp16's weights are float16, which the quantizer leaves float (README: known limitations).
for (const f of torchFixtures().filter((x) => x.name !== 'gpt2-fp16')) {
  for (const { label, opts } of VARIANTS) {
    const integer = opts.format === 'integer';
    describe(`torch export ${f.name}, ${label}`, () => {
      let out: string;
      let stack: Stack;

      before(async () => {
        out = await mkdtemp(join(tmpdir(), `ds-quant-${f.name}-`));
        // In-process (quantize.test.ts runs the command itself).
        await quantizeModelDir(f.dir, out, opts);
        stack = await startStack(out);
        const files = (await readdir(f.loraDir)).map((name) => ({ name, path: join(f.loraDir, name) }));
        await stack.services.registry.register('lora', files, { replace: false });
      });
      after(async () => {
        await stack?.close();
        await rm(out, { recursive: true, force: true });
      });

      test(`every linear${integer ? '' : ' but lm_head'} is served quantized`, () => {
        const mods = stack.services.backbone.info.modules;
        assert.ok(mods.length > 1);
        for (const m of mods) {
          assert.equal(m.quantization?.bits, m.name === 'lm_head' && !integer ? undefined : opts.bits, m.name);
          if (m.quantization) assert.equal(m.quantization.format, integer ? 'MatMulInteger' : 'MatMulNBits');
        }
      });

      test(`greedy ids alone and in one mixed batch equal the dequantized reference with the PEFT LoRA merged`, async () => {
        const { backbone } = stack.services;
        const qmodel = readModel(join(out, 'model.onnx'));
        const reference = integer ? dequantizedIntegerModel : dequantizedModel;
        const refs = { bare: await createSession(reference(qmodel)), lora: await createSession(reference(qmodel, peftLoraFactors(f.loraDir))) };
        const p = params({ maxNewTokens: f.maxNewTokens });
        const reqs = f.prompts.flatMap((pr) => [{ task: 'lora', text: pr.text }, { task: null, text: pr.text }]);
        const alone: number[][] = [];
        for (const r of reqs) alone.push((await generate(stack.services, r.task, r.text, p)).tokens);
        const together = (await Promise.all(reqs.map((r) => generate(stack.services, r.task, r.text, p)))).map((x) => x.tokens);
        let unlikeTorch = 0;
        let batchedAsAlone = 0;
        for (const [i, r] of reqs.entries()) {
          const ids = backbone.tokenizer.encode(r.text, { addSpecialTokens: true });
          const ref = r.task ? refs.lora : refs.bare;
          const want = integer ? await incrementalGreedy(ref, backbone.io, ids, alone[i].length) : await fullForwardGreedy(ref, backbone.io, ids, alone[i]);
          assert.deepEqual(alone[i], want, `${r.text} (${r.task ?? 'bare'}) alone`);
          // MatMulInteger's activations are quantized per row (rewrite/row-quantize.ts): batch-invariant too.
          assert.deepEqual(together[i], want, `${r.text} (${r.task ?? 'bare'}) in the mixed batch`);
          if (together[i].join() === alone[i].join()) batchedAsAlone++;
          const torch = f.prompts.find((pr) => pr.text === r.text)![r.task ? 'lora' : 'bare'];
          if (torch.slice(0, alone[i].length).join() !== alone[i].join()) unlikeTorch++;
        }
        assert.ok(reqs.some((r, i) => r.task && alone[i].join() !== alone[i + 1].join()), 'the LoRA never changed the ids');
        console.log(`# ${f.name} ${label}: ${reqs.length} runs alone equal the dequantized reference (${batchedAsAlone} the same in the mixed batch); ${unlikeTorch} differ from PyTorch's float32 ids (the quantization's own error)`);
      });
    });
  }
}
