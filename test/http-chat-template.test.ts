import assert from 'node:assert/strict';
import { test } from 'node:test';
import request from 'supertest';
import { chatTemplateFromTokenizerConfig, createChatTemplate } from '../src/http/chat-template.js';
import { testApp } from './helpers/http-app.js';

// Llama-2's chat template as published in its tokenizer_config.json (trimmed of the system-message branch).
const LLAMA2 =
  "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" +
  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}" +
  "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}" +
  "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}";

test('the default template is ChatML with a generation prompt', () => {
  const out = createChatTemplate().render([{ role: 'user', content: 'Hi' }]);
  assert.equal(out, '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n');
});

test("a tokenizer_config's template and special tokens are used", () => {
  const t = chatTemplateFromTokenizerConfig({ chat_template: LLAMA2, bos_token: { content: '<s>' }, eos_token: '</s>' });
  const out = t.render([{ role: 'user', content: 'a' }, { role: 'assistant', content: 'b' }, { role: 'user', content: 'c' }]);
  assert.equal(out, '<s>[INST] a [/INST] b </s>[INST] c [/INST]');
});

test('named templates: the "default" one is chosen', () => {
  const t = chatTemplateFromTokenizerConfig({ chat_template: [{ name: 'tool_use', template: 'T' }, { name: 'default', template: 'D{{ messages[0].content }}' }] });
  assert.equal(t.render([{ role: 'user', content: 'x' }]), 'Dx');
});

test("a template's raise_exception becomes a 422 that quotes it", async () => {
  const { app } = testApp({ chatTemplate: chatTemplateFromTokenizerConfig({ chat_template: LLAMA2 }) });
  const res = await request(app).post('/v1/chat/completions').send({ model: 'test-backbone', messages: [{ role: 'assistant', content: 'x' }] });
  assert.equal(res.status, 422);
  assert.match(res.body.error.message, /roles must alternate/);
});

test('a template that does not compile fails at startup, not per request', () => {
  assert.throws(() => createChatTemplate({ template: '{% for %}' }), /chat_template does not compile/);
});
