import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { buildByteTokenizer } from '../src/backbone/demo/byte-tokenizer.js';
import { createTokenizer, loadTokenizer, type BackboneTokenizer } from '../src/backbone/tokenizer.js';
import { IncrementalDetokenizer } from '../src/engine/detokenizer.js';
import { StopSequenceMatcher } from '../src/engine/stop-sequences.js';

const GPT2_FIXTURE = new URL('../../shared/fixtures/peft-gpt2-lora-causal/', import.meta.url).pathname;
const fixtureSkip = existsSync(join(GPT2_FIXTURE, 'tokenizer.json'))
  ? false
  : `GPT-2 fixture absent (${GPT2_FIXTURE}); fresh clones have no ../shared`;

const byteTok = createTokenizer(buildByteTokenizer({ flavour: 'llama', vocabSize: 300 }));

function stream(tok: BackboneTokenizer, ids: number[], promptIds?: number[]): string[] {
  const detok = new IncrementalDetokenizer(tok, { promptIds });
  const pieces = ids.map((id) => detok.push(id));
  pieces.push(detok.flush());
  return pieces;
}

test('detokenizer: an emoji split over byte tokens emits nothing until complete, never U+FFFD', () => {
  const text = 'hi 😀 ok 日本 👍🏽!';
  const ids = byteTok.encode(text);
  const pieces = stream(byteTok, ids);
  assert.ok(pieces.every((p) => !p.includes('\uFFFD')), JSON.stringify(pieces));
  assert.equal(pieces.join(''), byteTok.decode(ids));
  assert.equal(pieces.join(''), text);
  // 😀 is F0 9F 98 80: three empty pieces, then the whole character with its 4th byte.
  const emoji = byteTok.encode('😀');
  assert.deepEqual(stream(byteTok, emoji), ['', '', '', '😀', '']);
});

test('detokenizer: special tokens add no text; a prompt gives context without being emitted', () => {
  const ids = [...byteTok.encode('é'), 257, ...byteTok.encode('x')];
  const pieces = stream(byteTok, ids, byteTok.encode('prompt ', { addSpecialTokens: true }));
  assert.deepEqual(pieces, ['', 'é', '', 'x', '']);
});

test('detokenizer: bytes that never form a character come out at the end, as a full decode shows them', () => {
  // F0 9F starts a 4-byte character that never completes.
  const ids = [0x61, 0xf0, 0x9f];
  const pieces = stream(byteTok, ids);
  assert.deepEqual(pieces.slice(0, 3), ['a', '', '']);
  assert.equal(pieces.join(''), byteTok.decode(ids));
  assert.ok(pieces[3].includes('\uFFFD'));
  // An invalid byte followed by more text is released with that text, not held forever.
  const mixed = [0x61, 0xff, 0x62, 0x63];
  const out = stream(byteTok, mixed);
  assert.equal(out.join(''), byteTok.decode(mixed));
  assert.equal(out[3], 'c');
});

test('detokenizer on the real GPT-2 tokenizer: pieces concatenate to the full decode', { skip: fixtureSkip }, async () => {
  const tok = await loadTokenizer(GPT2_FIXTURE);
  const text = " Hello, world! Emoji: 😀👍🏽 and ünïcödé, 日本語. It's done.";
  const ids = tok.encode(text);
  const pieces = stream(tok, ids, tok.encode('Prompt:'));
  assert.ok(pieces.every((p) => !p.includes('\uFFFD')), JSON.stringify(pieces));
  assert.equal(pieces.join(''), tok.decode(ids, { cleanUpSpaces: false }));
  assert.equal(pieces.join(''), text);
});

function run(matcher: StopSequenceMatcher, pieces: string[]): { streamed: string[]; stop: string | null } {
  const streamed: string[] = [];
  for (const piece of pieces) {
    const r = matcher.push(piece);
    streamed.push(r.text);
    if (r.stop !== null) return { streamed, stop: r.stop };
  }
  streamed.push(matcher.flush());
  return { streamed, stop: null };
}

test('stop string spanning several tokens: never streamed, text before it kept', () => {
  const m = new StopSequenceMatcher(['###', 'END']);
  const { streamed, stop } = run(m, ['Hello', ' #', '#', '# more']);
  assert.equal(stop, '###');
  assert.deepEqual(streamed, ['Hello', ' ', '', '']);
  assert.equal(streamed.join(''), 'Hello ');
  assert.ok(m.done);
  assert.deepEqual(m.push('later'), { text: '', stop: '###' });
});

test('held-back prefixes are released when they turn out not to match', () => {
  const m = new StopSequenceMatcher(['###']);
  const { streamed, stop } = run(m, ['a #', '#', 'b', ' c #']);
  assert.equal(stop, null);
  assert.deepEqual(streamed, ['a ', '', '##b', ' c ', '#']);
  assert.equal(streamed.join(''), 'a ##b c #');
});

test('stop strings: inside one piece, at the very start, overlapping candidates, earliest wins', () => {
  assert.deepEqual(new StopSequenceMatcher(['\n\n']).push('one\n\ntwo'), { text: 'one', stop: '\n\n' });
  assert.deepEqual(new StopSequenceMatcher(['User:']).push('User: hi'), { text: '', stop: 'User:' });

  // "abab" then "c": the stop "abc" starts at the second "ab"; the first must be released.
  const overlap = run(new StopSequenceMatcher(['abc']), ['ab', 'ab', 'c']);
  assert.equal(overlap.stop, 'abc');
  assert.equal(overlap.streamed.join(''), 'ab');

  const earliest = new StopSequenceMatcher(['world', 'lo w']).push('hello world');
  assert.deepEqual(earliest, { text: 'hel', stop: 'lo w' });
  const longest = new StopSequenceMatcher(['ab', 'abc']).push('xabcd');
  assert.deepEqual(longest, { text: 'x', stop: 'abc' });
});

test('stop strings with multi-byte characters, fed by the detokenizer byte by byte', () => {
  const detok = new IncrementalDetokenizer(byteTok);
  const m = new StopSequenceMatcher(['😀!']);
  const streamed: string[] = [];
  let stop: string | null = null;
  for (const id of byteTok.encode('ok 😀?😀! never')) {
    const r = m.push(detok.push(id));
    streamed.push(r.text);
    if ((stop = r.stop) !== null) break;
  }
  assert.equal(stop, '😀!');
  assert.equal(streamed.join(''), 'ok 😀?');
});

test('no stop strings (or only empty ones): everything streams at once', () => {
  const m = new StopSequenceMatcher(['']);
  assert.deepEqual(m.push('abc'), { text: 'abc', stop: null });
  assert.equal(m.flush(), '');
});
