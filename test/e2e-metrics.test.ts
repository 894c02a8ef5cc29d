/**
 * /metrics on the REAL stack after real traffic: every metric name of the
 * contract with a sample, the LoRA info gauge naming the adapter that runs
 * (scraped while a long stream is in flight), and the batch and delta cache
 * counters moved by that traffic.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import request from 'supertest';
import { listenOn, openStream, peftLora, startStack, waitFor, type Listening, type Stack } from './helpers/e2e-stack.js';

const CONTRACT_METRICS = [
  'deltaserve_num_requests_waiting',
  'deltaserve_num_requests_running',
  'deltaserve_kv_cache_usage_perc',
  'deltaserve_lora_requests_info',
  'deltaserve_request_duration_seconds',
  'deltaserve_time_to_first_token_seconds',
  'deltaserve_time_per_output_token_seconds',
  'deltaserve_prompt_tokens_total',
  'deltaserve_generated_tokens_total',
  'deltaserve_batch_size',
  'deltaserve_delta_cache_hits_total',
  'deltaserve_delta_cache_misses_total',
  'deltaserve_delta_cache_evictions_total',
  'deltaserve_delta_cache_bytes',
  'deltaserve_delta_load_seconds',
  'deltaserve_deltas_registered',
  'deltaserve_engine_transfer_bytes_total',
  'deltaserve_delta_bank_bytes',
];

const TYPES: Record<string, string> = {
  deltaserve_num_requests_waiting: 'gauge', deltaserve_num_requests_running: 'gauge', deltaserve_kv_cache_usage_perc: 'gauge',
  deltaserve_lora_requests_info: 'gauge', deltaserve_request_duration_seconds: 'histogram', deltaserve_time_to_first_token_seconds: 'histogram',
  deltaserve_time_per_output_token_seconds: 'histogram', deltaserve_prompt_tokens_total: 'counter', deltaserve_generated_tokens_total: 'counter',
  deltaserve_batch_size: 'histogram', deltaserve_delta_cache_hits_total: 'counter', deltaserve_delta_cache_misses_total: 'counter',
  deltaserve_delta_cache_evictions_total: 'counter', deltaserve_delta_cache_bytes: 'gauge', deltaserve_delta_load_seconds: 'histogram',
  deltaserve_deltas_registered: 'gauge', deltaserve_engine_transfer_bytes_total: 'counter', deltaserve_delta_bank_bytes: 'gauge',
};

interface Sample { name: string; labels: Record<string, string>; value: number }

/** Parses Prometheus text format samples (enough of it for these metrics). */
function parse(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$/.exec(line);
    assert.ok(m, `unparseable metrics line: ${line}`);
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

const value = (samples: Sample[], name: string, labels: Record<string, string> = {}) =>
  samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)).reduce((a, s) => a + s.value, 0);

describe('e2e: /metrics after real traffic', () => {
  let stack: Stack;
  let server: Listening;
  before(async () => {
    // Room for one of these deltas in the cache, not two: alternating tasks must evict.
    stack = await startStack({ env: { DELTASERVE_CACHE_BYTES: '100000' } });
    server = await listenOn(stack.services.app);
  });
  after(async () => {
    await server?.close();
    await stack?.close();
  });

  test('every contract metric, the running adapter named during a run, batch and cache counters non-zero', async () => {
    const app = stack.services.app;
    const info = stack.services.backbone.info;
    for (const [id, seed] of [['task-a', 1], ['task-b', 2]] as const) {
      const f = peftLora(info, seed);
      await request(app).post('/v1/deltas').field('id', id)
        .attach('a', f['adapter_config.json'], 'adapter_config.json').attach('b', f['adapter_model.safetensors'], 'adapter_model.safetensors').expect(201);
    }
    const gen = (task: string | null) => request(app).post('/v1/generate').send({ task, inputs: 'metrics please', parameters: { max_new_tokens: 6 } }).expect(200);
    await gen('task-a'); // miss
    await gen('task-a'); // hit
    await gen('task-b'); // miss; evicts task-a
    await gen(null);
    await request(app).post('/v1/chat/completions').send({ model: 'task-a', messages: [{ role: 'user', content: 'hi' }], max_tokens: 4 }).expect(200);
    await request(app).post('/v1/generate').send({ task: 'nope', inputs: 'x' }).expect(404);

    // Scrape while a long stream on task-b runs.
    const long = openStream(`${server.url}/v1/generate`, { task: 'task-b', inputs: 'go on', parameters: { max_new_tokens: 1000 }, stream: true });
    assert.equal(await long.status, 200);
    await long.firstEvent;
    const during = await fetch(`${server.url}/metrics`);
    assert.equal(during.status, 200);
    assert.match(during.headers.get('content-type') ?? '', /^text\/plain/);
    const text = await during.text();
    long.abort();
    const samples = parse(text);

    for (const name of CONTRACT_METRICS) {
      assert.match(text, new RegExp(`^# TYPE ${name} ${TYPES[name]}$`, 'm'), `${name} is declared as a ${TYPES[name]}`);
      const suffixes = TYPES[name] === 'histogram' ? ['_bucket', '_sum', '_count'] : [''];
      for (const sfx of suffixes) assert.ok(samples.some((s) => s.name === name + sfx), `${name}${sfx} has a sample`);
    }

    const info1 = samples.filter((s) => s.name === 'deltaserve_lora_requests_info');
    assert.equal(info1.length, 1, 'one current series');
    assert.equal(info1[0].labels.running_lora_adapters, 'task-b', 'the adapter that runs, while it runs');
    assert.equal(info1[0].labels.waiting_lora_adapters, '');
    assert.equal(info1[0].labels.max_lora, '32');
    assert.ok(Math.abs(info1[0].value - Date.now() / 1000) < 60, 'value: unix time of the last update');
    assert.equal(value(samples, 'deltaserve_num_requests_running'), 1);
    assert.ok(value(samples, 'deltaserve_kv_cache_usage_perc') > 0, 'the running row holds KV cache');
    assert.ok(value(samples, 'deltaserve_kv_cache_usage_perc') <= 1);

    assert.ok(value(samples, 'deltaserve_batch_size_count') > 10, 'engine steps were counted');
    assert.ok(value(samples, 'deltaserve_delta_cache_misses_total') >= 2);
    assert.ok(value(samples, 'deltaserve_delta_cache_hits_total') >= 1);
    assert.ok(value(samples, 'deltaserve_delta_cache_evictions_total') >= 1, 'task-b pushed task-a out of a one-delta cache');
    assert.ok(value(samples, 'deltaserve_delta_cache_bytes') > 0);
    assert.ok(value(samples, 'deltaserve_delta_cache_bytes') <= 100000);
    assert.ok(value(samples, 'deltaserve_delta_load_seconds_count') >= 2);
    assert.equal(value(samples, 'deltaserve_deltas_registered'), 2);
    // The CPU provider reads host arrays in place: the counter exists by direction, and nothing crossed.
    assert.equal(value(samples, 'deltaserve_engine_transfer_bytes_total', { direction: 'to_device' }), 0);
    assert.equal(value(samples, 'deltaserve_engine_transfer_bytes_total', { direction: 'to_host' }), 0);
    assert.ok(value(samples, 'deltaserve_delta_bank_bytes') > 0, 'the running LoRA row\'s bank slices are counted');
    assert.equal(value(samples, 'deltaserve_delta_bank_budget_bytes'), 2 ** 30, 'the default bank budget');

    for (const task of ['task-a', 'task-b', '_base']) {
      assert.ok(value(samples, 'deltaserve_request_duration_seconds_count', { task, status: '200' }) >= 1, `${task} requests by status`);
      assert.ok(value(samples, 'deltaserve_time_to_first_token_seconds_count', { task }) >= 1, `${task} TTFT`);
      assert.ok(value(samples, 'deltaserve_prompt_tokens_total', { task }) > 0, `${task} prompt tokens`);
    }
    assert.equal(value(samples, 'deltaserve_generated_tokens_total', { task: 'task-a' }), 6 + 6 + 4);
    assert.ok(value(samples, 'deltaserve_time_per_output_token_seconds_count', { task: 'task-a' }) >= 3);
    assert.ok(value(samples, 'deltaserve_request_duration_seconds_count', { status: '404' }) >= 1, 'a 404 is counted too');

    // After the stream ends, nothing runs and the gauge says so.
    await waitFor('the aborted stream to leave the batch', () => stack.services.scheduler.runningCount === 0);
    const afterRun = parse((await request(app).get('/metrics').expect(200)).text);
    assert.equal(afterRun.find((s) => s.name === 'deltaserve_lora_requests_info')!.labels.running_lora_adapters, '');
    assert.equal(value(afterRun, 'deltaserve_num_requests_running'), 0);
    assert.equal(value(afterRun, 'deltaserve_delta_bank_bytes'), 0, 'the banks hold nothing once the batch is empty');
  });
});
