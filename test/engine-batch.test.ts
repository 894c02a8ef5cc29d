/**
 * Batch invariance on the real stack (startServices: real registry and files,
 * real ORT in the real engine worker, real scheduler): a request's output is
 * the same token for token whether it runs alone or in a crowded batch of
 * other tasks (LoRA of several ranks and formats, adapters with different
 * activations, BitFit, bare rows), for greedy and for seeded sampling. And the
 * HTTP event loop answers /healthz while the engine is saturated.
 *
 * "Alone" is the same stack with only that request in flight, which the step
 * recorder checks (no step holds more than one row).
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import request from 'supertest';
import type { SamplingParams } from '../src/engine/types.js';
import { generate, mixedTasks, params, prompt, registerDelta, startStack, type Run, type Stack } from './helpers/engine-stack.js';

interface Req {
  task: string | null;
  prompt: string;
  p: SamplingParams;
}

/** Runs each request alone, one after another, and checks that no step held another row. */
async function runAlone(stack: Stack, reqs: Req[]): Promise<Run[]> {
  const out: Run[] = [];
  for (const r of reqs) {
    const mark = stack.steps.mark();
    out.push(await generate(stack.services, r.task, r.prompt, r.p));
    const crowded = stack.steps.since(mark).filter((s) => s.rows.length > 1);
    assert.equal(crowded.length, 0, 'an "alone" run shared a step with another row');
  }
  return out;
}

/**
 * Runs all requests concurrently: the first `firstWave` at once, the rest as
 * soon as the engine has posted its first step, so they join a running batch.
 * Returns the runs and how crowded the engine's steps were.
 */
async function runCrowded(stack: Stack, reqs: Req[], firstWave: number) {
  const mark = stack.steps.mark();
  const runs: Promise<Run>[] = reqs.slice(0, firstWave).map((r) => generate(stack.services, r.task, r.prompt, r.p));
  await stack.steps.next();
  runs.push(...reqs.slice(firstWave).map((r) => generate(stack.services, r.task, r.prompt, r.p)));
  const done = await Promise.all(runs);
  const steps = stack.steps.since(mark);
  return {
    runs: done,
    maxRows: Math.max(...steps.map((s) => s.rows.length)),
    maxDeltas: Math.max(...steps.map((s) => s.stats.runningDeltas.length)),
    maxDecodeRows: Math.max(...steps.map((s) => s.stats.decodeRows)),
    prefillWithDecode: steps.some((s) => s.stats.prefillRows > 0 && s.stats.decodeRows > 0),
  };
}

function compare(reqs: Req[], alone: Run[], crowded: Run[]): void {
  const diffs: string[] = [];
  reqs.forEach((r, i) => {
    const a = alone[i];
    const c = crowded[i];
    if (JSON.stringify(a.tokens) !== JSON.stringify(c.tokens) || a.result.finishReason !== c.result.finishReason) {
      diffs.push(`#${i} task=${r.task} prompt=${r.prompt.length}B seed=${r.p.seed}: alone [${a.tokens}] ${a.result.finishReason} vs crowded [${c.tokens}] ${c.result.finishReason}`);
    }
    // The streamed ids and the final text must agree too.
    assert.equal(c.tokens.length, c.result.generatedTokens);
    assert.equal(c.result.generatedText, a.result.generatedText, `#${i} text`);
  });
  assert.deepEqual(diffs, [], `${diffs.length} of ${reqs.length} requests changed in a batch:\n${diffs.join('\n')}`);
}

for (const model of ['demo:llama', 'demo:gpt2']) {
  describe(`batch invariance on ${model}`, () => {
    let stack: Stack;
    let tasks: (string | null)[];

    before(async () => {
      // A small prefill budget: alone a prompt is prefilled in one run, crowded in many chunks.
      stack = await startStack(model, { DELTASERVE_MAX_BATCH: '32', DELTASERVE_PREFILL_CHUNK_TOKENS: '128' });
      const specs = mixedTasks(stack.services.backbone.info);
      for (const s of specs) await registerDelta(stack, s);
      tasks = [null, ...specs.map((s) => s.id)];
      assert.equal(tasks.length, 8);
    });
    after(() => stack?.close());

    test('the eight tasks really differ: one prompt, eight different greedy outputs', async () => {
      const reqs = tasks.map((task) => ({ task, prompt: prompt(24, 3), p: params({ maxNewTokens: 8 }) }));
      const runs = await runAlone(stack, reqs);
      const distinct = new Set(runs.map((r) => r.tokens.join(',')));
      assert.equal(distinct.size, 8, `outputs per task: ${runs.map((r, i) => `${tasks[i]}=[${r.tokens}]`).join(' ')}`);
    });

    test('32 concurrent greedy requests over 8 tasks equal each request run alone', async () => {
      const reqs: Req[] = Array.from({ length: 32 }, (_, i) => ({
        task: tasks[i % 8],
        prompt: prompt(2 + ((i * 13) % 47), i),
        p: params({ maxNewTokens: 8 + (i % 7) }),
      }));
      const alone = await runAlone(stack, reqs);
      const crowded = await runCrowded(stack, reqs, 24);
      assert.ok(crowded.maxRows >= 24, `the batch was never crowded: at most ${crowded.maxRows} rows in a step`);
      assert.ok(crowded.maxDeltas >= 6, `at most ${crowded.maxDeltas} distinct deltas shared a step`);
      assert.ok(crowded.prefillWithDecode, 'late requests never prefilled beside running rows');
      compare(reqs, alone, crowded.runs);
      // Outputs that all look alike would prove little.
      const distinct = new Set(alone.map((r) => r.tokens.join(','))).size;
      assert.ok(distinct >= 28, `only ${distinct} distinct outputs among 32 requests`);
    });

    if (model === 'demo:llama') {
      test('seeded sampling gives the same text alone and in a crowded batch', async () => {
        const seeded: Req[] = Array.from({ length: 16 }, (_, i) => ({
          task: tasks[i % 8],
          prompt: prompt(4 + ((i * 11) % 37), 100 + i),
          p: params({
            maxNewTokens: 12, temperature: 0.7 + (i % 4) * 0.2, seed: 1000 + i,
            topK: i % 3 === 0 ? 0 : 20 + i, topP: i % 2 ? 0.9 : 1, repetitionPenalty: i % 4 === 1 ? 1.3 : 1,
          }),
        }));
        const fillers: Req[] = Array.from({ length: 16 }, (_, i) => ({
          task: tasks[(i + 3) % 8], prompt: prompt(10 + i * 2, 200 + i), p: params({ maxNewTokens: 6 + (i % 5) }),
        }));
        const alone = await runAlone(stack, seeded);

        // Sampling is really sampling: the same prompt and task give another text under another seed, and differ from greedy.
        const [again] = await runAlone(stack, [{ ...seeded[0], p: { ...seeded[0].p, seed: 4242 } }]);
        const [greedy] = await runAlone(stack, [{ ...seeded[0], p: params({ maxNewTokens: 12 }) }]);
        assert.notDeepEqual(again.tokens, alone[0].tokens, 'another seed gave the same tokens');
        assert.notDeepEqual(greedy.tokens, alone[0].tokens, 'sampling gave the greedy tokens');

        // Interleave so seeded rows sit among greedy rows of other tasks.
        const mixed = seeded.flatMap((s, i) => [s, fillers[i]]);
        const crowded = await runCrowded(stack, mixed, 20);
        assert.ok(crowded.maxRows >= 20, `at most ${crowded.maxRows} rows in a step`);
        compare(seeded, alone, crowded.runs.filter((_, i) => i % 2 === 0));
      });

      test('GET /healthz answers while 32 long requests saturate the engine', async (t) => {
        const runs = Array.from({ length: 32 }, (_, i) =>
          generate(stack.services, tasks[i % 8], prompt(8 + i, 300 + i), params({ maxNewTokens: 160 })));
        await stack.steps.next((s) => s.stats.decodeRows >= 32);
        const latencies: number[] = [];
        for (let k = 0; k < 5; k++) {
          const t0 = performance.now();
          const res = await request(stack.services.app).get('/healthz');
          latencies.push(performance.now() - t0);
          assert.equal(res.status, 200);
          assert.deepEqual(res.body, { status: 'ok' });
          // It answered while the engine still held the batch.
          assert.ok(stack.services.scheduler.runningCount >= 16, `only ${stack.services.scheduler.runningCount} rows were running when /healthz answered`);
        }
        t.diagnostic(`/healthz latency under a saturated engine (ms): ${latencies.map((l) => l.toFixed(1)).join(', ')}`);
        const done = await Promise.all(runs);
        for (const r of done) assert.ok(r.result.generatedTokens > 0);
      });
    }
  });
}
