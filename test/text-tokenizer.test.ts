import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { buildByteTokenizer, writeByteTokenizer } from '../src/backbone/demo/byte-tokenizer.js';
import { createTokenizer, loadTokenizer } from '../src/backbone/tokenizer.js';

const GPT2_FIXTURE = new URL('../../shared/fixtures/peft-gpt2-lora-causal/', import.meta.url).pathname;
const hasFixture = existsSync(join(GPT2_FIXTURE, 'tokenizer.json'));
const fixtureSkip = hasFixture ? false : `GPT-2 fixture absent (${GPT2_FIXTURE}); fresh clones have no ../shared`;

const SAMPLES = ['Hello world', '  leading spaces\tand\ttabs\n', 'héllo wörld — ünïcode', 'emoji 😀👍🏽 mix', '日本語のテキスト', ''];

async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'deltaserve-tok-'));
  try {
    return await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test('byte tokenizer (llama): every byte is its own id, specials follow, padding fills the vocab', async () => {
  await withTempDir(async (dir) => {
    const files = await writeByteTokenizer(dir, { flavour: 'llama', vocabSize: 300 });
    assert.deepEqual(files.ids, { bos: 256, eos: 257, pad: 257 });
    const tok = await loadTokenizer(dir);
    assert.equal(tok.vocabSize, 300);
    assert.deepEqual(tok.eosTokenIds, [257]);
    assert.equal(tok.bosTokenId, 256);
    assert.equal(tok.padTokenId, 257);
    assert.deepEqual([...tok.specialTokens], [['<s>', 256], ['</s>', 257]]);
    for (const text of SAMPLES) {
      const ids = tok.encode(text);
      assert.deepEqual(ids, [...Buffer.from(text, 'utf8')], `bytes of ${JSON.stringify(text)}`);
      assert.equal(tok.decode(ids), text);
    }
    assert.deepEqual(tok.encode('hi', { addSpecialTokens: true }), [256, 104, 105]);
    assert.equal(tok.decode([256, 104, 105, 257]), 'hi');
    assert.equal(tok.decode([256, 104, 105, 257], { skipSpecial: false }), '<s>hi</s>');
    assert.equal(tok.decode([299]), '<|unused_41|>');
  });
});

test('byte tokenizer (gpt2): <|endoftext|> is bos, eos and pad; a GPT-2-small-sized vocab', () => {
  const files = buildByteTokenizer({ flavour: 'gpt2', vocabSize: 50257 });
  assert.deepEqual(files.ids, { bos: 256, eos: 256, pad: 256 });
  const tok = createTokenizer(files);
  assert.equal(tok.vocabSize, 50257);
  assert.deepEqual(tok.eosTokenIds, [256]);
  assert.deepEqual(tok.encode('a<|endoftext|>b', { addSpecialTokens: true }), [97, 256, 98]);
  assert.equal(tok.decode([97, 256, 98]), 'ab');
  for (const text of SAMPLES) assert.equal(tok.decode(tok.encode(text)), text);
});

test('byte tokenizer refuses a vocab too small for bytes and specials', () => {
  assert.throws(() => buildByteTokenizer({ flavour: 'llama', vocabSize: 257 }), /at least 258/);
});

test('chat templates of both flavours render with @huggingface/jinja', () => {
  const messages = [
    { role: 'user', content: 'Hi' },
    { role: 'assistant', content: 'Hello' },
    { role: 'user', content: 'Bye' },
  ];
  const llama = createTokenizer(buildByteTokenizer({ flavour: 'llama', vocabSize: 258 }));
  const rendered = new Template(llama.chatTemplate!).render({
    messages,
    add_generation_prompt: true,
    bos_token: '<s>',
    eos_token: '</s>',
  });
  assert.equal(rendered, '<s><|user|>\nHi</s>\n<|assistant|>\nHello</s>\n<|user|>\nBye</s>\n<|assistant|>\n');
  const ids = llama.encode(rendered);
  assert.equal(ids.filter((id) => id === 257).length, 3, 'eos text encodes to the eos token');
  assert.equal(ids[0], 256);

  const gpt2 = createTokenizer(buildByteTokenizer({ flavour: 'gpt2', vocabSize: 257 }));
  const plain = new Template(gpt2.chatTemplate!).render({ messages, add_generation_prompt: true });
  assert.equal(plain, 'user: Hi\nassistant: Hello\nuser: Bye\nassistant:');
});

test('generation_config eos ids come first, the tokenizer eos is kept; chat_template.jinja is read', async () => {
  await withTempDir(async (dir) => {
    await writeByteTokenizer(dir, {
      flavour: 'llama',
      vocabSize: 260,
      specialTokens: { bos: '<s>', eos: '</s>', pad: '<pad>', extra: ['<|eot|>'] },
      chatTemplate: undefined,
    });
    await writeFile(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: [259, 1], bos_token_id: 256 }));
    const tok = await loadTokenizer(dir);
    assert.deepEqual(tok.eosTokenIds, [259, 1, 257]);
    assert.equal(tok.padTokenId, 258);
  });
  await withTempDir(async (dir) => {
    const files = buildByteTokenizer({ flavour: 'gpt2', vocabSize: 257 });
    delete files.tokenizerConfig.chat_template;
    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(files.tokenizerJson));
    await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify(files.tokenizerConfig));
    await writeFile(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: 256 }));
    assert.equal((await loadTokenizer(dir)).chatTemplate, null);
    await writeFile(join(dir, 'chat_template.jinja'), '{{ messages[0].content }}');
    assert.equal((await loadTokenizer(dir)).chatTemplate, '{{ messages[0].content }}');
  });
});

test('a missing tokenizer file is named, with how to export the model', async () => {
  await withTempDir(async (dir) => {
    await assert.rejects(loadTokenizer(dir), (err: Error) => {
      assert.match(err.message, /tokenizer\.json/);
      assert.match(err.message, /optimum-cli export onnx .*--task text-generation-with-past/);
      return true;
    });
    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(buildByteTokenizer({ flavour: 'gpt2', vocabSize: 257 }).tokenizerJson));
    await assert.rejects(loadTokenizer(dir), /missing .*tokenizer_config\.json/);
    await writeFile(join(dir, 'tokenizer_config.json'), '{ not json');
    await assert.rejects(loadTokenizer(dir), /tokenizer_config\.json is not valid JSON/);
  });
});

test('the real GPT-2 tokenizer: known ids, round trips, eos', { skip: fixtureSkip }, async () => {
  const tok = await loadTokenizer(GPT2_FIXTURE);
  assert.deepEqual(tok.encode('Hello world'), [15496, 995]);
  assert.equal(tok.vocabSize, 50257);
  assert.deepEqual(tok.eosTokenIds, [50256]);
  assert.equal(tok.bosTokenId, 50256);
  assert.equal(tok.padTokenId, 50256);
  assert.equal(tok.chatTemplate, null);
  assert.equal(tok.modelMaxLength, 1024);
  assert.deepEqual([...tok.specialTokens], [['<|endoftext|>', 50256]]);
  for (const text of SAMPLES) assert.equal(tok.decode(tok.encode(text)), text);
  // The fixture's tokenizer.json declares truncation at 128; a server must not cut prompts silently.
  assert.equal(tok.encode('a '.repeat(300)).length, 301);
  assert.equal(tok.decode([15496, 50256, 995]), 'Hello world');
});
