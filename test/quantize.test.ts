/**
 * Quantized backbones. The format: `quantizeBlockwise`'s output, read back by
 * a plain re-implementation of MatMulNBits' documented dequantization, is
 * within half a step of every weight, and onnxruntime's MatMulNBits computes
 * exactly A·dequant(W)ᵀ on it. The served model: on demo backbones quantized by
 * `deltaserve quantize` (4-bit and 8-bit), a LoRA served through the real stack
 * gives the greedy tokens of a float reference whose weights are the plainly
 * dequantized ones with the LoRA merged in: the quantization error is the
 * backbone's, never the delta's.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import * as ort from 'onnxruntime-node';
import { resolveModelDir } from '../src/backbone/backbone.js';
import { encodeModel, readModel } from '../src/backbone/onnx/proto.js';
import request from 'supertest';
import { quantizeBlockwise, type Bits } from '../src/backbone/quant/matmul-nbits.js';
import { createSession } from '../src/backbone/session.js';
import { emptyCache, fullForwardGreedy, maxAbsDiff, runOriginal, testCacheDir } from './helpers/engine-graph.js';
import { generate, params, prompt, registerDelta, startStack, type Stack } from './helpers/engine-stack.js';
import { deltaFiles, type TaskSpec, type Tensors } from './helpers/kind-cases.js';
import { dequantizedModel, dequantizePlain, oneNodeModel, type LoraFactors } from './helpers/quant-reference.js';
import { randomFloats } from './helpers/deltas.js';

describe('the MatMulNBits format', () => {
  // K = 200 is not a multiple of any block: the last block is padded; 7 blocks of 32 make an odd count of 4-bit zero points.
  const N = 9;
  const K = 200;
  const W = randomFloats(N * K, 5, 0.3);
  for (let k = 0; k < 40; k++) W[3 * K + k] = 0; // a block of zeros (and part of the next)
  W[5 * K + 7] = 2.5; // an outlier widens one block's range

  for (const bits of [4, 8] as Bits[]) {
    for (const block of [32, 64, 128]) {
      test(`${bits}-bit, block ${block}: the plain dequantization is within half a step of each weight; zeros stay exact`, () => {
        const q = quantizeBlockwise((n, k) => W[n * K + k], N, K, bits, block);
        const deq = dequantizePlain({ N, K, bits, blockSize: block, B: q.packed, scales: q.scales, zeroPoints: q.zeroPoints });
        const nBlocks = Math.ceil(K / block);
        let worst = 0;
        for (let n = 0; n < N; n++) {
          for (let k = 0; k < K; k++) {
            const step = q.scales[n * nBlocks + Math.floor(k / block)];
            const err = Math.abs(deq[n * K + k] - W[n * K + k]);
            assert.ok(err <= step / 2 + 1e-6, `W[${n}, ${k}] = ${W[n * K + k]} came back as ${deq[n * K + k]} (step ${step})`);
            worst = Math.max(worst, err);
            if (W[n * K + k] === 0) assert.equal(deq[n * K + k], 0, `zero at [${n}, ${k}]`);
          }
        }
        assert.ok(worst > 0, 'nothing was rounded: the test would not see a wrong step');
      });

      test(`${bits}-bit, block ${block}: onnxruntime's MatMulNBits computes A·dequant(W)ᵀ`, async () => {
        const q = quantizeBlockwise((n, k) => W[n * K + k], N, K, bits, block);
        const w = { N, K, bits, blockSize: block, B: q.packed, scales: q.scales, zeroPoints: q.zeroPoints };
        const deq = dequantizePlain(w);
        const M = 3;
        const A = randomFloats(M * K, 6, 1);
        const sess = await createSession(oneNodeModel(w, M));
        const Y = (await sess.run({ A: new ort.Tensor('float32', A, [M, K]) })).Y.data as Float32Array;
        const want = new Float32Array(M * N);
        for (let m = 0; m < M; m++) for (let n = 0; n < N; n++) {
          let s = 0;
          for (let k = 0; k < K; k++) s += A[m * K + k] * deq[n * K + k];
          want[m * N + n] = s;
        }
        assert.ok(maxAbsDiff(Y, want) < 1e-4, `max abs diff ${maxAbsDiff(Y, want)}`);
      });
    }
  }
});

const run = promisify(execFile);
const LORA_TARGETS = { llama: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], gpt2: ['c_attn', 'c_proj', 'c_fc'] };

describe('deltaserve quantize refuses what it cannot do, saying why', () => {
  const refused = async (args: string[]) => {
    try {
      await run(process.execPath, ['--import', 'tsx', 'src/cli.ts', 'quantize', ...args]);
    } catch (e) {
      return (e as { stderr: string }).stderr;
    }
    assert.fail(`quantize ${args.join(' ')} succeeded`);
  };

  test('bits other than 4 or 8, the model\'s own folder as --out, a folder that is not a model', async () => {
    const { dir } = await resolveModelDir({ model: 'demo:llama', cacheDir: testCacheDir() });
    assert.match(await refused(['--bits', '3', '--model', dir, '--out', join(tmpdir(), 'x')]), /--bits.*choices are 4, 8|Allowed choices are 4, 8/);
    assert.match(await refused(['--bits', '4', '--model', dir, '--out', dir]), /--out must be another folder/);
    const empty = await mkdtemp(join(tmpdir(), 'ds-not-a-model-'));
    assert.match(await refused(['--bits', '4', '--model', empty, '--out', join(empty, 'q')]), /lacks model\.onnx/);
  });
});

/** `lmHead`: --include-lm-head (GPT-2's is the tied embedding, read transposed by a Gemm). */
const CASES: { model: 'demo:llama' | 'demo:gpt2'; bits: Bits; block: number; lmHead?: boolean }[] = [
  { model: 'demo:llama', bits: 4, block: 32 },
  { model: 'demo:gpt2', bits: 4, block: 32 },
  { model: 'demo:llama', bits: 8, block: 64 },
  { model: 'demo:gpt2', bits: 8, block: 128, lmHead: true },
];

for (const { model, bits, block, lmHead } of CASES) {
  describe(`a LoRA on ${model} quantized to ${bits}-bit (block ${block}${lmHead ? ', lm_head too' : ''})`, () => {
    let out: string;
    let float: string;
    let stack: Stack;
    let spec: TaskSpec;
    let lora: LoraFactors;

    before(async () => {
      const { dir } = await resolveModelDir({ model, cacheDir: testCacheDir() });
      float = dir;
      out = await mkdtemp(join(tmpdir(), 'ds-quant-'));
      // The command itself, as a user runs it.
      await run(process.execPath, ['--import', 'tsx', 'src/cli.ts', 'quantize', '--bits', String(bits), '--block', String(block), '--model', dir, '--out', out, ...(lmHead ? ['--include-lm-head'] : [])]);
      stack = await startStack(out);
      const family = stack.services.backbone.info.family as 'llama' | 'gpt2';
      spec = { id: 'lora', kind: 'peft-lora', rank: 8, targets: LORA_TARGETS[family], seed: 31 };
      await registerDelta(stack, spec);
      const t = deltaFiles(stack.services.backbone.info, spec)['adapter_model.safetensors'] as Tensors;
      lora = new Map(stack.services.backbone.info.modules.filter((m) => t[`base_model.model.${m.name}.lora_A.weight`]).map((m) => [m.name, {
        A: t[`base_model.model.${m.name}.lora_A.weight`].data as Float32Array,
        B: t[`base_model.model.${m.name}.lora_B.weight`].data as Float32Array,
        r: 8, scale: 2, // lora_alpha = 2r
      }]));
    });
    after(() => stack?.close());

    test(`every linear${lmHead ? '' : ' but lm_head'} is quantized; the fingerprint is the float backbone's`, async () => {
      const info = stack.services.backbone.info;
      for (const m of info.modules) {
        if (m.name.endsWith('lm_head') && !lmHead) assert.equal(m.quantization, undefined);
        else assert.deepEqual(m.quantization, { format: 'MatMulNBits', bits, blockSize: block }, m.name);
      }
      const float = await startStack(model);
      try {
        assert.equal(info.fingerprint, float.services.backbone.info.fingerprint);
      } finally {
        await float.close();
      }
    });

    test('GET /v1/backbone and inspect say which modules are quantized and how', async () => {
      const body = (await request(stack.services.app).get('/v1/backbone').expect(200)).body;
      const c = body.modules.find((m: { name: string }) => m.name.endsWith(LORA_TARGETS[body.family as 'llama' | 'gpt2'][0]));
      assert.deepEqual(c.quantization, { format: 'MatMulNBits', bits, block_size: block });
      assert.equal(body.modules.find((m: { name: string }) => m.name === 'lm_head').quantization?.bits, lmHead ? bits : undefined);
      const { stdout } = await run(process.execPath, ['--import', 'tsx', 'src/cli.ts', 'inspect', '--model', out]);
      assert.match(stdout, new RegExp(`${body.modules.length - (lmHead ? 0 : 1)} quantized`));
      assert.match(stdout, new RegExp(`MatMulNBits ${bits}-bit, block ${block}`));
    });

    test('the quantized model is the dequantized reference to float rounding, and measurably not the float model', async () => {
      const { backbone } = stack.services;
      const qmodel = readModel(join(out, 'model.onnx'));
      const ids = [backbone.tokenizer.encode(prompt(12, 4), { addSpecialTokens: true })];
      const logits = async (bytes: Uint8Array) => (await runOriginal(await createSession(bytes), backbone.io, { ids, past: emptyCache(backbone.io, 1) })).logits;
      const quantized = await logits(encodeModel(qmodel));
      const toReference = maxAbsDiff(quantized, await logits(dequantizedModel(qmodel)));
      const toFloat = maxAbsDiff(quantized, await logits(encodeModel(readModel(join(float, 'model.onnx')))));
      assert.ok(toReference < 1e-3, `quantized vs dequantized reference: ${toReference}`);
      assert.ok(toFloat > 20 * toReference, `quantized vs float ${toFloat} is not clearly more than vs the reference ${toReference}`);
      console.log(`# ${model} ${bits}-bit: logits vs dequantized reference ${toReference.toExponential(2)}, vs float ${toFloat.toExponential(2)}`);
    });

    test('greedy tokens, alone and in one mixed batch, equal the dequantized reference with the LoRA merged', async () => {
      const { backbone } = stack.services;
      const qmodel = readModel(join(out, 'model.onnx'));
      const refs = { bare: await createSession(dequantizedModel(qmodel)), lora: await createSession(dequantizedModel(qmodel, lora)) };
      const p = params({ maxNewTokens: 10 });
      const reqs = [prompt(9, 1), prompt(14, 2), prompt(6, 3)].flatMap((text) => [{ task: 'lora', text }, { task: null, text }]);
      const alone: number[][] = [];
      for (const r of reqs) alone.push((await generate(stack.services, r.task, r.text, p)).tokens);
      const together = (await Promise.all(reqs.map((r) => generate(stack.services, r.task, r.text, p)))).map((x) => x.tokens);
      for (const [i, r] of reqs.entries()) {
        const ids = backbone.tokenizer.encode(r.text, { addSpecialTokens: true });
        const want = await fullForwardGreedy(r.task ? refs.lora : refs.bare, backbone.io, ids, alone[i]);
        assert.deepEqual(alone[i], want, `request ${i} (${r.task ?? 'bare'}) alone`);
        assert.deepEqual(together[i], want, `request ${i} (${r.task ?? 'bare'}) in the mixed batch`);
      }
      assert.ok(reqs.some((r, i) => r.task && alone[i].join() !== alone[i + 1].join()), 'the LoRA never changed the tokens: equality above would not show it is applied');
    });
  });
}
