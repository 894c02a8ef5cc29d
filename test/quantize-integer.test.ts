/**
 * 8-bit MatMulInteger backbones in onnxruntime quantize_dynamic's layout
 * (onnx-community's `model_quantized.onnx`), as `deltaserve quantize --format
 * integer` writes them. The format: the codes are those onnxruntime's
 * quantize_data gives (hand-computed cases, ties to even), every weight comes
 * back within half a step under ONNX DequantizeLinear's formula, and
 * onnxruntime's MatMulInteger with per-channel zero points computes the plain
 * integer sum. The served model: on the demo backbones, a LoRA served through
 * the real stack gives, alone, the greedy tokens of a reference graph that
 * keeps the model's DynamicQuantizeLinear, multiplies the dequantized
 * activations by the plainly dequantized weights in float, and adds the LoRA
 * merged as a dense ΔW on the float input (test/helpers/quant-reference.ts),
 * decoded with its KV cache as a lone request is; and every request of a
 * mixed batch (LoRA and bare, prompts of different lengths, rows joining a
 * running batch) gets exactly its tokens alone: activations are quantized per
 * row (rewrite/row-quantize.ts, whose codes are checked against
 * DynamicQuantizeLinear run on each row alone).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import * as ort from 'onnxruntime-node';
import request from 'supertest';
import { resolveModelDir } from '../src/backbone/backbone.js';
import { DataType, decodeModel, encodeModel, onnx, readModel } from '../src/backbone/onnx/proto.js';
import { quantizeInteger, type IntegerWeightOptions } from '../src/backbone/quant/matmul-integer.js';
import { createSession } from '../src/backbone/session.js';
import { GraphEditor } from '../src/backbone/rewrite/editor.js';
import { quantizeActivationsPerRow } from '../src/backbone/rewrite/row-quantize.js';
import { baseFeeds, emptyCache, incrementalGreedy, maxAbsDiff, testCacheDir } from './helpers/engine-graph.js';
import { generate, params, prompt, registerDelta, startStack, type Stack } from './helpers/engine-stack.js';
import { deltaFiles, type TaskSpec, type Tensors } from './helpers/kind-cases.js';
import { dequantizedIntegerModel, dequantizeIntegerPlain, type LoraFactors } from './helpers/quant-reference.js';
import { randomFloats } from './helpers/deltas.js';

const codesOf = (W: number[], K: number, N: number, opts: IntegerWeightOptions) => {
  const q = quantizeInteger((k, n) => W[k * N + n], K, N, opts);
  return { codes: [...q.codes], scales: [...q.scales], zeroPoints: [...q.zeroPoints] };
};

describe('the MatMulInteger weight format (onnxruntime quantize_data)', () => {
  test('int8 is symmetric: absmax over 64 steps with reduce_range, 127 without; zero point 0; ties round to even', () => {
    // absmax 1 → scale 2/128 = 1/64: 0.5 → 32, 1.5/64 → 1.5 → 2, 2.5/64 → 2.5 → 2 (half to even), −1 → −64.
    const W = [-1, 0.5, 1.5 / 64, 2.5 / 64];
    assert.deepEqual(codesOf(W, 4, 1, { weightType: 'int8', perChannel: false, reduceRange: true }), { codes: [-64, 32, 2, 2], scales: [1 / 64], zeroPoints: [0] });
    const full = codesOf([-1, 0.5], 2, 1, { weightType: 'int8', perChannel: false, reduceRange: false });
    assert.equal(full.scales[0], Math.fround(2 / 254));
    assert.deepEqual(full.codes, [-127, 64]); // 0.5·127 = 63.5 → 64 (even)
  });

  test('uint8 is asymmetric over the range widened to 0: zero point round(−rmin/scale)', () => {
    // [−1, 3]: scale 4/255, zero point round(63.75) = 64; 3 → round(191.25) + 64 = 255.
    const q = codesOf([-1, 3, 0], 3, 1, { weightType: 'uint8', perChannel: false, reduceRange: false });
    assert.equal(q.scales[0], Math.fround(4 / 255));
    assert.deepEqual({ codes: q.codes, zeroPoints: q.zeroPoints }, { codes: [0, 255, 64], zeroPoints: [64] });
  });

  test('per channel: one scale per output feature (a column of W [K, N])', () => {
    const q = codesOf([1, -4, 0.5, 2], 2, 2, { weightType: 'int8', perChannel: true, reduceRange: true });
    assert.deepEqual(q.scales, [1 / 64, 4 / 64]);
    assert.deepEqual(q.codes, [64, -64, 32, 32]);
  });

  const K = 70;
  const N = 11;
  const W = randomFloats(K * N, 9, 0.2);
  W[5 * N + 3] = 1.7; // an outlier in one column
  for (let k = 0; k < K; k++) W[k * N + 8] = 0; // a column of zeros
  for (const opts of [
    { weightType: 'int8', perChannel: true, reduceRange: true },
    { weightType: 'int8', perChannel: false, reduceRange: false },
    { weightType: 'uint8', perChannel: true, reduceRange: false },
    { weightType: 'uint8', perChannel: false, reduceRange: true },
  ] as IntegerWeightOptions[]) {
    const label = `${opts.weightType}, ${opts.perChannel ? 'per channel' : 'per tensor'}${opts.reduceRange ? ', reduce_range' : ''}`;
    const tensors = () => {
      const q = quantizeInteger((k, n) => W[k * N + n], K, N, opts);
      const type = opts.weightType === 'int8' ? DataType.INT8 : DataType.UINT8;
      const u8 = (a: Int8Array | Uint8Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
      const dims = opts.perChannel ? [N] : [];
      return {
        q,
        codes: { name: 'W_q', dataType: type, dims: [K, N], rawData: u8(q.codes) },
        scale: { name: 'W_scale', dataType: DataType.FLOAT, dims, rawData: u8(new Uint8Array(q.scales.buffer)) },
        zp: { name: 'W_zp', dataType: type, dims, rawData: u8(q.zeroPoints) },
      };
    };

    test(`${label}: DequantizeLinear's formula gives every weight back within half a step; zeros stay exact`, () => {
      const { q, codes, scale, zp } = tensors();
      const deq = dequantizeIntegerPlain(codes, scale, zp);
      let worst = 0;
      for (let k = 0; k < K; k++) {
        for (let n = 0; n < N; n++) {
          const step = q.scales[opts.perChannel ? n : 0];
          const err = Math.abs(deq[k * N + n] - W[k * N + n]);
          assert.ok(err <= step / 2 + 1e-7, `W[${k}, ${n}] = ${W[k * N + n]} came back as ${deq[k * N + n]} (step ${step})`);
          if (W[k * N + n] === 0) assert.equal(deq[k * N + n], 0, `zero at [${k}, ${n}]`);
          worst = Math.max(worst, err);
        }
      }
      assert.ok(worst > 0, 'nothing was rounded');
    });

    test(`${label}: onnxruntime's MatMulInteger is the plain Σ (a − a_zp)(w − w_zp)`, async () => {
      const { codes, zp } = tensors();
      const M = 3;
      const A = Uint8Array.from({ length: M * K }, (_, i) => (i * 37 + 11) % 256);
      const aZp = 131;
      const vi = (name: string, elemType: number, dims: number[]) => ({ name, type: { tensorType: { elemType, shape: { dim: dims.map((d) => ({ dimValue: d })) } } } });
      const bytes = encodeModel(onnx.ModelProto.create({
        irVersion: 8, opsetImport: [{ domain: '', version: 17 }],
        graph: {
          name: 'mmi', node: [{ name: 'mm', opType: 'MatMulInteger', input: ['A', 'W_q', 'a_zp', 'W_zp'], output: ['Y'] }],
          initializer: [codes, zp, { name: 'a_zp', dataType: DataType.UINT8, dims: [], rawData: Uint8Array.of(aZp) }],
          input: [vi('A', DataType.UINT8, [M, K])], output: [vi('Y', DataType.INT32, [M, N])],
        },
      }));
      const Y = (await (await createSession(bytes)).run({ A: new ort.Tensor('uint8', A, [M, K]) })).Y.data as Int32Array;
      const signed = opts.weightType === 'int8';
      const code = (b: Uint8Array, i: number) => (signed ? (b[i] << 24) >> 24 : b[i]);
      for (let m = 0; m < M; m++) {
        for (let n = 0; n < N; n++) {
          let s = 0;
          for (let k = 0; k < K; k++) s += (A[m * K + k] - aZp) * (code(codes.rawData, k * N + n) - code(zp.rawData, opts.perChannel ? n : 0));
          assert.equal(Y[m * N + n], s, `Y[${m}, ${n}]`);
        }
      }
    });
  }
});

describe('per-row activation quantization (rewrite/row-quantize.ts): each row\'s codes are DynamicQuantizeLinear\'s on that row alone', () => {
  const K = 24;
  const N = 5;
  const wq = quantizeInteger((k, n) => Math.sin(k * 7 + n * 3) * (n + 1), K, N, { weightType: 'int8', perChannel: true, reduceRange: true });
  const vi = (name: string, elemType: number, dims: (number | string)[]) => ({ name, type: { tensorType: { elemType, shape: { dim: dims.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })) } } } });
  const u8 = (a: Int8Array | Uint8Array | Float32Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  /** quantize_dynamic's chain on x [batch, seq, K] (or its 2-D view, as a Gemm reads it), the codes also an output. */
  const chainModel = (twoD: boolean, opset: number) => onnx.ModelProto.create({
    irVersion: 8, opsetImport: [{ domain: '', version: opset }],
    graph: {
      name: 'chain',
      node: [
        ...(twoD ? [{ name: 'view', opType: 'Reshape', input: ['x', 'flat'], output: ['x2'] }] : []),
        { name: 'dql', opType: 'DynamicQuantizeLinear', input: [twoD ? 'x2' : 'x'], output: ['q', 'x_scale', 'x_zp'] },
        { name: 'mm', opType: 'MatMulInteger', input: ['q', 'W_q', 'x_zp', 'W_zp'], output: ['acc'] },
        { name: 'cast', opType: 'Cast', input: ['acc'], output: ['acc_f'], attribute: [{ name: 'to', type: onnx.AttributeProto.AttributeType.INT, i: DataType.FLOAT }] },
        { name: 'scales', opType: 'Mul', input: ['x_scale', 'W_scale'], output: ['s'] },
        { name: 'out', opType: 'Mul', input: ['acc_f', 's'], output: ['y'] },
      ],
      initializer: [
        { name: 'W_q', dataType: DataType.INT8, dims: [K, N], rawData: u8(wq.codes) },
        { name: 'W_zp', dataType: DataType.INT8, dims: [N], rawData: u8(wq.zeroPoints) },
        { name: 'W_scale', dataType: DataType.FLOAT, dims: [N], rawData: u8(wq.scales) },
        { name: 'flat', dataType: DataType.INT64, dims: [2], int64Data: [-1, K] },
      ],
      input: [vi('input_ids', DataType.INT64, ['b', 's']), vi('attention_mask', DataType.INT64, ['b', 't']), vi('x', DataType.FLOAT, ['b', 's', K])],
      output: [vi('y', DataType.FLOAT, twoD ? ['bs', N] : ['b', 's', N]), vi('q', DataType.UINT8, twoD ? ['bs', K] : ['b', 's', K])],
    },
  });
  const i64 = (n: number, dims: number[], v = 1n) => new ort.Tensor('int64', new BigInt64Array(n).fill(v), dims);

  // Opset 18 moved ReduceMin/ReduceMax's axes from an attribute to an input.
  for (const [twoD, opset] of [[false, 17], [true, 17], [false, 18]] as const) {
    test(`${twoD ? '2-D view' : '3-D input'}, opset ${opset}: codes bit for bit, and the product as the model's own chain gives it, whatever the batchmates and left padding`, async () => {
      const original = chainModel(twoD, opset);
      const editor = new GraphEditor(original);
      assert.equal(quantizeActivationsPerRow(editor, opset, '.'), 1);
      const rowWise = await createSession(editor.encodeModel());
      const alone = await createSession(encodeModel(original));
      // Rows of very different ranges (one all zeros: hi = lo = 0, scale 1), left-padded with large values
      // that must not count, and values on exact half steps of the row's scale (ties go to even).
      const S = 6;
      const lens = [6, 3, 4, 2];
      const B = lens.length;
      const x = new Float32Array(B * S * K);
      const rows: Float32Array[] = lens.map((len, b) => {
        if (b === 3) return new Float32Array(len * K);
        // Row 1 spans [0, 255/128]: its scale is exactly 1/128 and every other value sits on a half step.
        if (b === 1) return Float32Array.from({ length: len * K }, (_, i) => (i === 0 ? 255 / 128 : (((i * 37) % 255) + 0.5) / 128));
        return randomFloats(len * K, 40 + b, [0.05, 3, 40][b]);
      });
      for (let b = 0; b < B; b++) {
        const pad = S - lens[b];
        for (let i = 0; i < pad * K; i++) x[b * S * K + i] = 1e3 * (i % 2 ? 1 : -1);
        x.set(rows[b], (b * S + pad) * K);
      }
      const past = 2;
      const mask = new BigInt64Array(B * (past + S));
      for (let b = 0; b < B; b++) for (let j = 0; j < past + S; j++) mask[b * (past + S) + j] = j < past || j - past >= S - lens[b] ? 1n : 0n;
      const got = await rowWise.run({ input_ids: i64(B * S, [B, S], 0n), attention_mask: new ort.Tensor('int64', mask, [B, past + S]), x: new ort.Tensor('float32', x, [B, S, K]) });
      const q = got.q.data as Uint8Array;
      const y = got.y.data as Float32Array;
      for (let b = 0; b < B; b++) {
        const len = lens[b];
        const pad = S - len;
        const one = await alone.run({ input_ids: i64(len, [1, len], 0n), attention_mask: i64(len, [1, len]), x: new ort.Tensor('float32', rows[b], [1, len, K]) });
        assert.deepEqual([...q.subarray((b * S + pad) * K, (b + 1) * S * K)], [...(one.q.data as Uint8Array)], `row ${b}'s codes`);
        const want = one.y.data as Float32Array;
        const mine = y.subarray((b * S + pad) * N, (b + 1) * S * N);
        const top = want.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
        assert.ok(maxAbsDiff(mine, want) <= 1e-6 * top, `row ${b}'s product: ${maxAbsDiff(mine, want)} (largest ${top})`);
      }
      assert.ok(new Set(lens.map((_, b) => q[(b * S + S - 1) * K])).size > 1, 'the rows got the same codes: the test would not show per-row scales');
    });
  }
});

const run = promisify(execFile);
const LORA_TARGETS = { llama: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], gpt2: ['c_attn', 'c_proj', 'c_fc'] };
/** IA³ where PEFT puts it: its feed-forward input scaling gives that MatMulInteger a DynamicQuantizeLinear of its own (delta-sites.ts). */
const IA3 = { llama: { targets: ['k_proj', 'v_proj', 'down_proj'], feedforward: ['down_proj'] }, gpt2: { targets: ['c_attn', 'mlp.c_proj'], feedforward: ['mlp.c_proj'] } };

const CASES: { model: 'demo:llama' | 'demo:gpt2'; args: string[]; lmHead: boolean; weightType: 'int8' | 'uint8'; perChannel: boolean }[] = [
  // onnx-community's conversion: int8 per channel, reduce_range, lm_head quantized too.
  { model: 'demo:llama', args: ['--include-lm-head'], lmHead: true, weightType: 'int8', perChannel: true },
  { model: 'demo:gpt2', args: ['--weight-type', 'uint8', '--per-tensor', '--full-range'], lmHead: false, weightType: 'uint8', perChannel: false },
];

for (const { model, args, lmHead, weightType, perChannel } of CASES) {
  describe(`a LoRA on ${model} quantized to 8-bit MatMulInteger (${args.join(' ')})`, () => {
    let out: string;
    let float: string;
    let stack: Stack;
    let lora: LoraFactors;

    before(async () => {
      float = (await resolveModelDir({ model, cacheDir: testCacheDir() })).dir;
      out = await mkdtemp(join(tmpdir(), 'ds-quant-int-'));
      await run(process.execPath, ['--import', 'tsx', 'src/cli.ts', 'quantize', '--bits', '8', '--format', 'integer', ...args, '--model', float, '--out', out]);
      stack = await startStack(out);
      const family = stack.services.backbone.info.family as 'llama' | 'gpt2';
      const spec: TaskSpec = { id: 'lora', kind: 'peft-lora', rank: 8, targets: LORA_TARGETS[family], seed: 31 };
      await registerDelta(stack, spec);
      await registerDelta(stack, { id: 'ia3', kind: 'ia3', ...IA3[family], seed: 33 });
      const t = deltaFiles(stack.services.backbone.info, spec)['adapter_model.safetensors'] as Tensors;
      lora = new Map(stack.services.backbone.info.modules.filter((m) => t[`base_model.model.${m.name}.lora_A.weight`]).map((m) => [m.name, {
        A: t[`base_model.model.${m.name}.lora_A.weight`].data as Float32Array,
        B: t[`base_model.model.${m.name}.lora_B.weight`].data as Float32Array,
        r: 8, scale: 2,
      }]));
    });
    after(() => stack?.close());

    test('the graph is quantize_dynamic\'s: DynamicQuantizeLinear shared by the linears reading one tensor, `_quant` names, no contrib ops', () => {
      const g = readModel(join(out, 'model.onnx')).graph!;
      const ops = (t: string) => (g.node ?? []).filter((n) => n.opType === t);
      const mms = ops('MatMulInteger');
      assert.ok(mms.every((n) => n.name!.endsWith('/MatMul_quant')), mms.map((n) => n.name).join());
      assert.ok(ops('DynamicQuantizeLinear').length < mms.length || model === 'demo:gpt2', 'q/k/v should share one DynamicQuantizeLinear');
      assert.ok(ops('Mul').some((n) => n.name!.endsWith('/MatMul_quant_scales_mul')));
      assert.ok(!(g.node ?? []).some((n) => n.domain === 'com.microsoft'));
    });

    test('every linear is a module of its float name; /v1/backbone and inspect say "MatMulInteger 8-bit, dynamic activations"', async () => {
      const info = stack.services.backbone.info;
      const want = { format: 'MatMulInteger', bits: 8, weightType, perChannel, activations: 'dynamic' };
      for (const m of info.modules) assert.deepEqual(m.quantization, m.name === 'lm_head' && !lmHead ? undefined : want, m.name);
      const floatStack = await startStack(model);
      try {
        assert.equal(info.fingerprint, floatStack.services.backbone.info.fingerprint);
      } finally {
        await floatStack.close();
      }
      const body = (await request(stack.services.app).get('/v1/backbone').expect(200)).body;
      assert.deepEqual(body.modules[0].quantization, { format: 'MatMulInteger', bits: 8, weight_type: weightType, per_channel: perChannel, activations: 'dynamic' });
      const { stdout } = await run(process.execPath, ['--import', 'tsx', 'src/cli.ts', 'inspect', '--model', out]);
      assert.match(stdout, new RegExp(`${info.modules.length - (lmHead ? 0 : 1)} quantized`));
      assert.match(stdout, /MatMulInteger 8-bit, dynamic activations/);
    });

    test('the first layer\'s linears are the reference\'s to float rounding; past them the logits are nearer the reference than the float model', async () => {
      // Past the first quantized linear the two graphs' float rounding differs, and an activation that lands
      // by a hair on the other side of a rounding boundary moves a DynamicQuantizeLinear code by one step:
      // exact agreement holds where both read the same codes, the first layer.
      const { backbone } = stack.services;
      const qmodel = readModel(join(out, 'model.onnx'));
      const firstLayer = (qmodel.graph!.node ?? []).filter((n) => n.opType === 'Mul' && /(layers|h)\.0\/.*_output_scale_mul$/.test(n.name!)).map((n) => n.output![0]);
      assert.ok(firstLayer.length >= 4, firstLayer.join());
      const withOutputs = (bytes: Uint8Array) => {
        const m = decodeModel(bytes);
        return encodeModel({ ...m, graph: { ...m.graph!, output: [...m.graph!.output!, ...firstLayer.map((name) => ({ name, type: { tensorType: { elemType: DataType.FLOAT } } }))] } });
      };
      const step = { ids: [backbone.tokenizer.encode(prompt(12, 4), { addSpecialTokens: true })], past: emptyCache(backbone.io, 1) };
      const outputs = async (bytes: Uint8Array) => (await createSession(bytes)).run(baseFeeds(step));
      const [quantized, reference, floatOut] = await Promise.all([encodeModel(qmodel), dequantizedIntegerModel(qmodel)].map((b) => outputs(withOutputs(b)))
        .concat([outputs(encodeModel(readModel(join(float, 'model.onnx'))))]));
      for (const t of firstLayer) {
        const [a, b] = [quantized[t].data as Float32Array, reference[t].data as Float32Array];
        assert.ok(maxAbsDiff(a, b) < 1e-5 * b.reduce((m, v) => Math.max(m, Math.abs(v)), 1), `${t}: ${maxAbsDiff(a, b)}`);
      }
      const logits = (o: typeof quantized) => o.logits.data as Float32Array;
      const toReference = maxAbsDiff(logits(quantized), logits(reference));
      const toFloat = maxAbsDiff(logits(quantized), logits(floatOut));
      assert.ok(toReference < toFloat, `quantized vs reference ${toReference} is not below quantized vs float ${toFloat}`);
      console.log(`# ${model} MatMulInteger: logits vs reference ${toReference.toExponential(2)}, vs float ${toFloat.toExponential(2)}`);
    });

    test('greedy tokens of each request, alone and in a mixed batch that others join mid-stream, equal the reference\'s with the LoRA merged', async () => {
      const { backbone } = stack.services;
      const qmodel = readModel(join(out, 'model.onnx'));
      const refs = { bare: await createSession(dequantizedIntegerModel(qmodel)), lora: await createSession(dequantizedIntegerModel(qmodel, lora)) };
      const p = params({ maxNewTokens: 10 });
      const reqs = [prompt(9, 1), prompt(14, 2), prompt(6, 3)].flatMap((text) => [{ task: 'lora', text }, { task: null, text }]);
      const alone: number[][] = [];
      for (const r of reqs) alone.push((await generate(stack.services, r.task, r.text, p)).tokens);
      for (const [i, r] of reqs.entries()) {
        const ids = backbone.tokenizer.encode(r.text, { addSpecialTokens: true });
        assert.deepEqual(alone[i], await incrementalGreedy(r.task ? refs.lora : refs.bare, backbone.io, ids, alone[i].length), `request ${i} (${r.task ?? 'bare'}) alone`);
      }
      assert.ok(reqs.some((r, i) => r.task && alone[i].join() !== alone[i + 1].join()), 'the LoRA never changed the tokens: equality above would not show it is applied');
      // Activations are quantized per row (rewrite/row-quantize.ts): batchmates, their prompt lengths
      // (left padding) and rows joining a running batch change nothing. Two IA³ rows join too (their
      // feed-forward input is requantized, per row as well); they are checked against their tokens alone.
      const ia3 = [prompt(11, 5), prompt(7, 6)].map((text) => ({ task: 'ia3', text }));
      for (const r of ia3) alone.push((await generate(stack.services, r.task, r.text, p)).tokens);
      reqs.splice(3, 0, ...ia3);
      alone.splice(3, 0, ...alone.splice(-2));
      const mark = stack.steps.mark();
      const first = reqs.slice(0, 3).map((r) => generate(stack.services, r.task, r.text, p));
      await stack.steps.next((st) => st.stats.decodeRows > 0);
      const later = reqs.slice(3).map((r) => generate(stack.services, r.task, r.text, p));
      const together = (await Promise.all([...first, ...later])).map((x) => x.tokens);
      const steps = stack.steps.since(mark);
      assert.ok(steps.some((st) => st.stats.decodeRows > 1), 'no decode step ran several rows');
      assert.ok(steps.some((st) => st.stats.prefillRows > 1), 'no prefill ran several rows (of different lengths)');
      assert.ok(steps.some((st) => st.stats.decodeRows > 0 && st.stats.prefillRows > 0), 'no row joined while others decoded');
      for (const [i, r] of reqs.entries()) assert.deepEqual(together[i], alone[i], `request ${i} (${r.task ?? 'bare'}) in the mixed batch`);
    });

    test('with short prefill runs: rows are prefilled together only while each prompt fits one run, so the mixed batch still gives the tokens alone', { skip: model !== 'demo:gpt2' && 'one backbone is enough for the scheduling rule' }, async () => {
      // A row's activations are quantized over its positions in each run: a prompt chunked differently
      // beside others than alone would get other codes. 24 tokens a run: the 8- and 10-token prompts
      // share one; the 14-token one would make three rows of 8-token chunks, so it runs on its own; the
      // 60-token one is chunked alone as it is alone. It comes first: the short ones arrive together
      // while its chunks run.
      const chunked = await startStack(out, { DELTASERVE_PREFILL_CHUNK_TOKENS: '24' });
      try {
        await registerDelta(chunked, { id: 'lora', kind: 'peft-lora', rank: 8, targets: LORA_TARGETS.gpt2, seed: 31 });
        const p = params({ maxNewTokens: 6 });
        const reqs = [prompt(60, 4), prompt(8, 1), prompt(10, 2), prompt(14, 3)].map((text, i) => ({ task: i === 0 || i === 3 ? 'lora' : null, text }));
        const lens = reqs.map((r) => chunked.services.backbone.tokenizer.encode(r.text, { addSpecialTokens: true }).length);
        assert.ok(2 * lens[2] <= 24 && 3 * lens[3] > 24 && lens[0] > 24, `prompt lengths ${lens.join()} do not exercise the rule`);
        const alone: number[][] = [];
        for (const r of reqs) alone.push((await generate(chunked.services, r.task, r.text, p)).tokens);
        const mark = chunked.steps.mark();
        const long = generate(chunked.services, reqs[0].task, reqs[0].text, p);
        await chunked.steps.next((st) => st.stats.prefillRows > 0);
        const rest = reqs.slice(1).map((r) => generate(chunked.services, r.task, r.text, p));
        const together = (await Promise.all([long, ...rest])).map((x) => x.tokens);
        const prefills = chunked.steps.since(mark).filter((st) => st.stats.prefillRows > 0);
        assert.ok(prefills.some((st) => st.stats.prefillRows > 1), 'no prefill ran several rows');
        for (const st of prefills) assert.ok(st.stats.prefillRows === 1 || st.stats.prefillTokens <= 24, `a ${st.stats.prefillRows}-row prefill ran ${st.stats.prefillTokens} tokens`);
        for (const [i, r] of reqs.entries()) assert.deepEqual(together[i], alone[i], `request ${i} (${lens[i]} tokens, ${r.task ?? 'bare'})`);
      } finally {
        await chunked.close();
      }
    });
  });
}
