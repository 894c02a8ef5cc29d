/**
 * max_loras and fairness on the real stack (DELTASERVE_MAX_LORAS=2,
 * DELTASERVE_MAX_BATCH=4): no engine step ever runs more than two distinct
 * deltas, and a rare task queued behind many popular-task requests is served
 * before the requests that arrived after it.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { bankBytesFor } from '../src/engine/bank-bytes.js';
import { demo } from './helpers/engine-graph.js';
import { generate, mixedTasks, params, prompt, registerDelta, startStack, type Run, type Stack } from './helpers/engine-stack.js';
import type { TaskSpec } from './helpers/kind-cases.js';

describe('max_loras=2 on demo:llama', () => {
  let stack: Stack;
  let ids: string[];

  before(async () => {
    stack = await startStack('demo:llama', { DELTASERVE_MAX_LORAS: '2', DELTASERVE_MAX_BATCH: '4' });
    const specs = mixedTasks(stack.services.backbone.info).slice(0, 4);
    for (const s of specs) await registerDelta(stack, s);
    ids = specs.map((s) => s.id);
  });
  after(() => stack?.close());

  test('never more than 2 distinct deltas in a step; every request completes with its alone output', async () => {
    const reqs = Array.from({ length: 24 }, (_, i) => ({
      task: i % 6 === 5 ? null : ids[i % 4], text: prompt(5 + ((i * 5) % 23), i), p: params({ maxNewTokens: 6 + (i % 4) }),
    }));
    const alone: Run[] = [];
    for (const r of reqs) alone.push(await generate(stack.services, r.task, r.text, r.p));

    const mark = stack.steps.mark();
    const runs = await Promise.all(reqs.map((r) => generate(stack.services, r.task, r.text, r.p)));
    const steps = stack.steps.since(mark);
    const most = Math.max(...steps.map((s) => s.stats.runningDeltas.length));
    assert.equal(most, 2, `the most distinct deltas in one step was ${most}`);
    assert.ok(steps.every((s) => s.rows.length <= 4), 'a step held more rows than DELTASERVE_MAX_BATCH');
    const served = new Set(steps.flatMap((s) => s.stats.runningDeltas));
    assert.deepEqual([...served].sort(), [...ids].sort(), 'not every task was served');
    runs.forEach((r, i) => assert.deepEqual(r.tokens, alone[i].tokens, `request ${i} (${reqs[i].task})`));
  });

  test('a rare task behind many popular-task requests is served before the requests that arrived after it', async () => {
    const sched = stack.services.scheduler;
    const [a, b, rare] = ids;
    // Four bare rows fill the batch until they are cancelled, so the queue's order is exactly the order of arrival below.
    const stopBlockers = new AbortController();
    const blockers = [0, 1, 2, 3].map((i) =>
      generate(stack.services, null, prompt(6, i), params({ maxNewTokens: 900 }), { signal: stopBlockers.signal }));
    assert.equal(sched.runningCount, 4);

    const firstTokenStep = new Map<string, number>();
    const doneStep = new Map<string, number>();
    const runs: Promise<Run>[] = [];
    const enqueue = async (name: string, task: string, maxNewTokens: number) => {
      const waiting = sched.waiting;
      runs.push(generate(stack.services, task, prompt(8, name.length), params({ maxNewTokens }), {
        onToken: () => {
          if (!firstTokenStep.has(name)) firstTokenStep.set(name, stack.steps.mark());
        },
      }).then((r) => {
        doneStep.set(name, stack.steps.mark() - 1);
        return r;
      }));
      // The task's existence check reads the store: wait for this request to reach the queue before the next one.
      while (sched.waiting === waiting) await new Promise((r) => setImmediate(r));
      assert.equal(sched.waiting, waiting + 1, `${name} did not join the queue behind the others`);
    };
    const popular = Array.from({ length: 8 }, (_, i) => `pop${i}`);
    const later = Array.from({ length: 8 }, (_, i) => `late${i}`);
    // Long A rows and short B rows desynchronise the batch: the rare task reaches the head of the queue while
    // both popular tasks run and rows are free, the moment a scheduler that skips it would admit later A rows.
    for (const [i, name] of popular.entries()) await enqueue(name, i % 2 ? b : a, i % 2 ? 5 : 30);
    await enqueue('rare', rare, 10);
    for (const name of later) await enqueue(name, a, 10);
    assert.equal(sched.runningCount, 4);
    assert.equal(sched.waiting, 17);

    const mark = stack.steps.mark();
    stopBlockers.abort();
    await Promise.all([...blockers, ...runs]);
    const steps = stack.steps.since(mark);
    assert.ok(steps.every((s) => s.stats.runningDeltas.length <= 2));

    const rareFirst = firstTokenStep.get('rare')!;
    const rareDone = doneStep.get('rare')!;
    for (const name of later) {
      assert.ok(rareFirst <= firstTokenStep.get(name)!, `${name} got its first token at step ${firstTokenStep.get(name)}, the rare task only at ${rareFirst}`);
      assert.ok(rareDone <= doneStep.get(name)!, `${name} finished at step ${doneStep.get(name)}, the rare task only at ${rareDone}`);
    }
    // FIFO among the popular ones too: none of the later requests started before the popular ones queued ahead of them.
    const lastPopular = Math.max(...popular.map((n) => firstTokenStep.get(n)!));
    const firstLate = Math.min(...later.map((n) => firstTokenStep.get(n)!));
    assert.ok(lastPopular <= firstLate, 'a later request overtook a popular one queued before it');
  });
});

describe('DELTASERVE_BANK_BYTES on demo:gpt2', () => {
  let stack: Stack;
  let oneRow: number;
  const tasks: TaskSpec[] = [1, 2].map((seed) => ({ id: `all-r8-${seed}`, kind: 'peft-lora', rank: 8, targets: ['c_attn', 'c_proj', 'c_fc'], seed }));

  before(async () => {
    // One row of a rank-8 LoRA on every linear holds (in + out)·8 floats per module in the banks; room for one row, not two.
    const { bb } = await demo('demo:gpt2');
    oneRow = bb.info.modules.filter((m) => !m.name.endsWith('lm_head')).reduce((n, m) => n + (m.inFeatures + m.outFeatures) * 8 * 4, 0);
    stack = await startStack('demo:gpt2', { DELTASERVE_BANK_BYTES: String(Math.floor(oneRow * 1.5)) });
    for (const t of tasks) await registerDelta(stack, t);
  });
  after(() => stack?.close());

  test('a request whose rows\' banks would pass the budget waits until the running row leaves', async () => {
    const mark = stack.steps.mark();
    const runs = await Promise.all([0, 1, 0].map((k, i) => generate(stack.services, tasks[k].id, prompt(6, i), params({ maxNewTokens: 5 }))));
    for (const r of runs) assert.equal(r.result.generatedTokens, 5);
    const steps = stack.steps.since(mark);
    assert.ok(steps.every((s) => s.rows.length <= 1), `a step held ${Math.max(...steps.map((s) => s.rows.length))} rows`);
    const held = steps.map((s) => s.stats.bankBytes);
    assert.ok(held.every((b) => b <= oneRow), `the banks held ${Math.max(...held)} bytes, one row is ${oneRow}`);
    assert.ok(held.includes(oneRow), 'a running row\'s banks hold its (in + out)·r floats per module');
    const projected = bankBytesFor(stack.services.backbone.info.modules.map((m) => ({ module: m.name, inFeatures: m.inFeatures, outFeatures: m.outFeatures, sites: [] })),
      [await stack.services.registry.load(tasks[0].id), await stack.services.registry.load(tasks[1].id)]);
    assert.equal(projected, 2 * oneRow, 'the scheduler\'s projection of two rows');
  });
});
