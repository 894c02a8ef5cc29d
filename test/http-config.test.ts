import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Command } from 'commander';
import { addConfigOptions, CONFIG_OPTIONS, ConfigError, loadConfig } from '../src/config.js';

test('defaults follow the contract table', () => {
  const c = loadConfig({});
  assert.equal(c.host, '0.0.0.0');
  assert.equal(c.port, 8080);
  assert.equal(c.model, 'demo');
  assert.equal(c.deltasDir, './deltas');
  assert.equal(c.importDir, null);
  assert.equal(c.adminToken, null);
  assert.equal(c.cacheBytes, null);
  assert.equal(c.maxBatch, 32);
  assert.equal(c.maxQueue, 1024);
  assert.equal(c.ep, 'cpu');
  assert.equal(c.logLevel, 'info');
  assert.equal(c.maxLoras, 32);
  assert.equal(c.maxRank, 64);
  assert.equal(c.drainSeconds, 30);
  assert.equal(c.metricsTaskLabels, 20);
});

test('environment variables are read and typed; flags win over them', () => {
  const env = {
    HOST: '127.0.0.1', PORT: '9000', DELTASERVE_MODEL: 'demo:gpt2', DELTASERVE_DELTAS_DIR: '/d',
    DELTASERVE_IMPORT_DIR: '/imp', DELTASERVE_ADMIN_TOKEN: 's3cret', DELTASERVE_CACHE_BYTES: '512MiB',
    DELTASERVE_MAX_BATCH: '8', DELTASERVE_MAX_QUEUE: '10', DELTASERVE_EP: 'cuda', LOG_LEVEL: 'debug',
    DELTASERVE_MAX_LORAS: '4', DELTASERVE_MAX_RANK: '16', DELTASERVE_MAX_BODY_BYTES: '1k', DELTASERVE_DRAIN_SECONDS: '5',
  };
  const c = loadConfig(env);
  assert.deepEqual(
    [c.host, c.port, c.model, c.deltasDir, c.importDir, c.adminToken, c.cacheBytes, c.maxBatch, c.maxQueue, c.ep, c.logLevel, c.maxLoras, c.maxRank, c.maxBodyBytes, c.drainSeconds],
    ['127.0.0.1', 9000, 'demo:gpt2', '/d', '/imp', 's3cret', 512 * 2 ** 20, 8, 10, 'cuda', 'debug', 4, 16, 1000, 5],
  );
  assert.equal(loadConfig(env, { port: '7000', ep: 'cpu' }).port, 7000);
  assert.equal(loadConfig(env, { port: '7000', ep: 'cpu' }).ep, 'cpu');
});

test('empty variables count as unset', () => {
  assert.equal(loadConfig({ PORT: '', DELTASERVE_ADMIN_TOKEN: '' }).port, 8080);
  assert.equal(loadConfig({ DELTASERVE_ADMIN_TOKEN: '' }).adminToken, null);
});

test('invalid values fail with every problem, naming the variable or flag', () => {
  assert.throws(
    () => loadConfig({ PORT: 'eighty', DELTASERVE_EP: 'tpu', DELTASERVE_CACHE_BYTES: 'lots' }, { maxBatch: '0' }),
    (err: unknown) => {
      assert.ok(err instanceof ConfigError);
      assert.equal(err.problems.length, 4);
      assert.match(err.message, /PORT: expected an integer from 0 to 65535, got "eighty"/);
      assert.match(err.message, /DELTASERVE_EP/);
      assert.match(err.message, /DELTASERVE_CACHE_BYTES: expected a byte size/);
      assert.match(err.message, /--max-batch: expected an integer from 1/);
      return true;
    },
  );
});

test('commander --help lists every flag with its environment variable, and its values feed loadConfig', () => {
  const cmd = addConfigOptions(new Command('serve').exitOverride());
  // Help wraps at the terminal width; compare with whitespace folded.
  const help = cmd.helpInformation().replace(/\s+/g, ' ');
  for (const opt of Object.values(CONFIG_OPTIONS)) {
    assert.ok(help.includes(opt.flag.split(' ')[0]), `${opt.flag} missing from --help`);
    assert.ok(help.includes(`env: ${opt.env}`), `${opt.env} missing from --help`);
  }
  assert.match(help, /default: 8080/);
  cmd.parse(['--port', '1234', '--max-loras', '3', '--import-dir', '/x'], { from: 'user' });
  const c = loadConfig({}, cmd.opts());
  assert.equal(c.port, 1234);
  assert.equal(c.maxLoras, 3);
  assert.equal(c.importDir, '/x');
});

test('DELTASERVE_SITES names every graph site the kinds use; DELTASERVE_BANK_BYTES takes a size (default 1GiB)', () => {
  assert.deepEqual(loadConfig({ DELTASERVE_SITES: 'ia3:all, adapter:none, lora:c_attn+q_proj' }).sites, { ia3: 'all', adapter: [], lora: ['c_attn', 'q_proj'] });
  assert.throws(() => loadConfig({ DELTASERVE_SITES: 'prefix:all' }),
    (err: ConfigError) => /DELTASERVE_SITES: expected site:targets with site one of lora, adapter, bias, ia3, compacter, low_rank_adapter, got "prefix:all"/.test(err.message));
  assert.equal(loadConfig({}).bankBytes, 2 ** 30);
  assert.equal(loadConfig({ DELTASERVE_BANK_BYTES: '64MiB' }).bankBytes, 64 * 2 ** 20);
});
