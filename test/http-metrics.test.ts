import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BASE_TASK_LABEL, Metrics, TaskLabeler } from '../src/metrics.js';

/** The contract table: name → type (and the labels that must appear once observed). */
const CONTRACT: [string, string][] = [
  ['deltaserve_num_requests_waiting', 'gauge'],
  ['deltaserve_num_requests_running', 'gauge'],
  ['deltaserve_kv_cache_usage_perc', 'gauge'],
  ['deltaserve_lora_requests_info', 'gauge'],
  ['deltaserve_request_duration_seconds', 'histogram'],
  ['deltaserve_time_to_first_token_seconds', 'histogram'],
  ['deltaserve_time_per_output_token_seconds', 'histogram'],
  ['deltaserve_prompt_tokens_total', 'counter'],
  ['deltaserve_generated_tokens_total', 'counter'],
  ['deltaserve_batch_size', 'histogram'],
  ['deltaserve_delta_cache_hits_total', 'counter'],
  ['deltaserve_delta_cache_misses_total', 'counter'],
  ['deltaserve_delta_cache_evictions_total', 'counter'],
  ['deltaserve_delta_cache_bytes', 'gauge'],
  ['deltaserve_delta_load_seconds', 'histogram'],
  ['deltaserve_deltas_registered', 'gauge'],
];

test('every contract metric is exposed with its type, plus process metrics', async () => {
  const text = await new Metrics().render();
  for (const [name, type] of CONTRACT) assert.ok(text.includes(`# TYPE ${name} ${type}\n`), `${name} ${type} missing`);
  assert.match(text, /^process_cpu_seconds_total /m);
  assert.match(text, /^nodejs_eventloop_lag_seconds /m);
});

test('helpers write the series the contract names, with its labels', async () => {
  const m = new Metrics({ defaultMetrics: false });
  m.setQueue(3, 2);
  m.setKvUsage(1.7);
  m.observeRequest('sql', 200, 0.5);
  m.observeTtft('sql', 0.1);
  m.observeTpot('sql', 0.02);
  m.addTokens('sql', 11, 7);
  m.addTokens(null, 5, 1);
  m.observeBatch(4);
  m.cacheHit(); m.cacheMiss(); m.cacheEvict(2);
  m.setCacheBytes(1234);
  m.observeDeltaLoad(0.03);
  m.setDeltasRegistered(9);
  const t = await m.render();
  for (const line of [
    'deltaserve_num_requests_waiting 3',
    'deltaserve_num_requests_running 2',
    'deltaserve_kv_cache_usage_perc 1',
    'deltaserve_request_duration_seconds_count{task="sql",status="200"} 1',
    'deltaserve_time_to_first_token_seconds_count{task="sql"} 1',
    'deltaserve_time_per_output_token_seconds_count{task="sql"} 1',
    'deltaserve_prompt_tokens_total{task="sql"} 11',
    'deltaserve_generated_tokens_total{task="sql"} 7',
    `deltaserve_prompt_tokens_total{task="${BASE_TASK_LABEL}"} 5`,
    'deltaserve_batch_size_bucket{le="4"} 1',
    'deltaserve_delta_cache_hits_total 1',
    'deltaserve_delta_cache_misses_total 1',
    'deltaserve_delta_cache_evictions_total 2',
    'deltaserve_delta_cache_bytes 1234',
    'deltaserve_delta_load_seconds_count 1',
    'deltaserve_deltas_registered 9',
  ]) assert.ok(t.includes(line + '\n'), `missing: ${line}`);
});

test('lora info gauge: one series, comma-separated ids, value = unix time of the update', async () => {
  const m = new Metrics({ defaultMetrics: false, maxLoras: 8 });
  m.setLoraInfo(8, ['a', 'b', 'a'], []);
  const before = Date.now() / 1000;
  m.setLoraInfo(8, ['sql', 'chat'], ['math']);
  const lines = (await m.render()).split('\n').filter((l) => l.startsWith('deltaserve_lora_requests_info{'));
  assert.equal(lines.length, 1);
  const match = /^deltaserve_lora_requests_info\{max_lora="8",running_lora_adapters="sql,chat",waiting_lora_adapters="math"\} (\S+)$/.exec(lines[0]);
  assert.ok(match, lines[0]);
  assert.ok(Number(match[1]) >= before - 1 && Number(match[1]) <= Date.now() / 1000 + 1);
});

test('the lora info gauge exists before the scheduler first reports', async () => {
  const t = await new Metrics({ defaultMetrics: false, maxLoras: 5 }).render();
  assert.match(t, /deltaserve_lora_requests_info\{max_lora="5",running_lora_adapters="",waiting_lora_adapters=""\}/);
});

test('task label: at most N tasks keep their name, the rest are "other"', async () => {
  const m = new Metrics({ defaultMetrics: false, maxTaskLabels: 2 });
  for (const task of ['a', 'b', 'c', 'd']) m.observeRequest(task, 200, 0.1);
  const t = await m.render();
  const tasks = new Set([...t.matchAll(/deltaserve_request_duration_seconds_count\{task="([^"]+)"/g)].map((x) => x[1]));
  assert.deepEqual([...tasks].sort(), ['a', 'b', 'other']);
  assert.match(t, /deltaserve_request_duration_seconds_count\{task="other",status="200"\} 2/);
});

test('a busier task displaces the least busy label holder, whose series go away', async () => {
  const m = new Metrics({ defaultMetrics: false, maxTaskLabels: 1 });
  m.observeRequest('quiet', 200, 0.1);
  m.addTokens('quiet', 1, 1);
  for (let i = 0; i < 2; i++) m.observeRequest('busy', 200, 0.1);
  const t = await m.render();
  assert.match(t, /task="busy"/);
  assert.doesNotMatch(t, /task="quiet"/);
});

test('labeler: no flapping between equally busy tasks; null is the base label', () => {
  const l = new TaskLabeler(1);
  assert.equal(l.label('x'), 'x');
  assert.equal(l.label('y'), 'other');
  assert.equal(l.label('x'), 'x');
  assert.equal(l.label('y'), 'other');
  assert.equal(l.label(null), BASE_TASK_LABEL);
});

test('metrics instances are isolated registries', async () => {
  const a = new Metrics({ defaultMetrics: false });
  const b = new Metrics({ defaultMetrics: false });
  a.setCacheBytes(5);
  assert.match(await a.render(), /deltaserve_delta_cache_bytes 5\n/);
  assert.match(await b.render(), /deltaserve_delta_cache_bytes 0\n/);
});
