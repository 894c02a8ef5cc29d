/**
 * The web console at `/`, in a real headless Chromium, against the REAL stack
 * (demo:llama backbone, real registry, engine worker, scheduler) on a real
 * listening server. Each column's text is checked against the API's own
 * answer for the same task, prompt and seed; the highlighted backbone sites
 * against the modules the test's delta targets, computed here from its config.
 *
 * `npm run screenshots` reruns this file writing the README's screenshots to docs/.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Page } from 'playwright-core';
import type { BackboneInfo } from '../src/backbone/types.js';
import { encodeSafetensors } from '../src/deltas/safetensors.js';
import { createLogger } from '../src/log.js';
import { browserMissing, launchBrowser, watchPage, type Browser, type PageWatch } from './helpers/browser.js';
import { randomFloats } from './helpers/deltas.js';
import { listenOn, peftLora, scratch, startStack, uploadDelta, waitFor, writeDelta, type Listening, type Stack } from './helpers/e2e-stack.js';

if (browserMissing) console.warn(`\n!!! SKIPPED: ${browserMissing}\n`);

const SHOTS = process.env.DELTASERVE_SCREENSHOTS_DIR;
const AXE = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');
/** Marked so that the logs can be searched for them afterwards. */
const PROMPT = 'Harbor-lighthouse-7 said: ';
const CHAT = 'Hello-marmalade-3, how are you?';
const TOKEN = 'open-sesame-42';

type Parameters = { max_new_tokens: number; temperature: number; top_k: number; top_p: number; repetition_penalty: number; seed: number };
const SAMPLED: Parameters = { max_new_tokens: 24, temperature: 0.9, top_k: 0, top_p: 0.95, repetition_penalty: 1, seed: 11 };
const GREEDY: Parameters = { ...SAMPLED, max_new_tokens: 16, temperature: 0, top_p: 1, seed: 0 };

async function post(url: string, body: unknown): Promise<any> {
  const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const json = await res.json();
  assert.equal(res.status, 200, JSON.stringify(json));
  return json;
}

/** Sets the playground's prompt, sampling fields and column tasks. */
async function setUpRun(page: Page, prompt: string, p: Parameters, tasks: string[]) {
  await page.fill('#prompt', prompt);
  for (const [name, value] of Object.entries(p)) await page.fill(`#run-form [name="${name}"]`, String(value));
  for (const [i, task] of tasks.entries()) await page.selectOption(`#columns .column:nth-child(${i + 1}) select.task`, task);
}

async function waitColumnsDone(page: Page) {
  await page.waitForFunction(() => [...document.querySelectorAll<HTMLElement>('.column')].every((c) => c.dataset.state === 'done'));
}

const columnTexts = (page: Page, selector = '.output pre') =>
  page.$$eval('.column', (cols, sel) => cols.map((c) => {
    const texts = c.querySelectorAll(sel);
    return { text: texts[texts.length - 1]?.textContent ?? '', tokens: Number((c as HTMLElement).dataset.tokens) };
  }), selector);

async function screenshot(page: Page, name: string) {
  if (!SHOTS) return;
  await mkdir(SHOTS, { recursive: true });
  await page.screenshot({ path: join(SHOTS, `console-${name}.png`), fullPage: true });
}

/** A PEFT LoRA the validator must refuse for two reasons: a q_proj factor of the wrong width, a module the backbone lacks. */
function refusedLora(info: BackboneInfo): Record<string, Buffer> {
  const q = info.modules.find((m) => m.name.endsWith('layers.0.self_attn.q_proj'))!;
  const r = 4;
  const t = (shape: number[], seed: number) => ({ dtype: 'F32' as const, shape, data: randomFloats(shape[0] * shape[1], seed) });
  const tensors = {
    [`base_model.model.${q.name}.lora_A.weight`]: t([r, q.inFeatures + 3], 1),
    [`base_model.model.${q.name}.lora_B.weight`]: t([q.outFeatures, r], 2),
    'base_model.model.model.layers.0.self_attn.nope_proj.lora_A.weight': t([r, 16], 3),
    'base_model.model.model.layers.0.self_attn.nope_proj.lora_B.weight': t([16, r], 4),
  };
  const config = { peft_type: 'LORA', task_type: 'CAUSAL_LM', r, lora_alpha: 8, target_modules: ['q_proj', 'nope_proj'], bias: 'none' };
  return { 'adapter_config.json': Buffer.from(JSON.stringify(config)), 'adapter_model.safetensors': Buffer.from(encodeSafetensors(tensors)) };
}

describe('web console in a real Chromium', { skip: browserMissing ?? false }, () => {
  let stack: Stack;
  let server: Listening;
  let browser: Browser;
  let info: BackboneInfo;
  let url: string;
  let files: Awaited<ReturnType<typeof scratch>>;
  const logLines: string[] = [];
  const watches: PageWatch[] = [];

  /** A new tab (its own session storage) on the console. */
  async function open(hash: string, viewport?: { width: number; height: number }) {
    const page = await browser.context.newPage();
    if (viewport) await page.setViewportSize(viewport);
    const watch = watchPage(page, url);
    watches.push(watch);
    await page.goto(`${url}/#${hash}`);
    await page.waitForSelector('body[data-ready="true"]');
    return { page, watch };
  }

  before(async () => {
    files = await scratch('console');
    await mkdir(join(files.dir, 'import'));
    stack = await startStack({
      env: { DELTASERVE_MODEL: 'demo:llama', DELTASERVE_IMPORT_DIR: join(files.dir, 'import') },
      logger: createLogger('debug', { write: (line: string) => void logLines.push(line) }),
    });
    info = stack.services.backbone.info;
    server = await listenOn(stack.services.app);
    url = server.url;
    for (const [id, delta] of Object.entries({
      alpha: peftLora(info, 1, { rank: 4, targets: ['q_proj', 'v_proj'] }),
      beta: peftLora(info, 2, { rank: 4, targets: ['o_proj', 'down_proj'], layers: [1, 2] }),
    })) assert.equal((await uploadDelta(url, id, delta)).status, 201);
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    await server?.close();
    await stack?.close();
    await files?.remove();
  });

  test('the page loads with no console errors, fetches nothing off its origin, and axe finds no accessibility violation on any tab', async () => {
    const { page, watch } = await open('playground');
    for (const tab of ['playground', 'backbone', 'deltas', 'live']) {
      await page.click(`#tab-${tab}`);
      assert.equal(await page.isVisible(`#panel-${tab}`), true);
      assert.equal(new URL(page.url()).hash, `#${tab}`);
      if (tab === 'deltas') await page.waitForSelector('#deltas-table tr[data-id="alpha"]');
      // CDP's evaluate is not subject to the page's CSP, which (rightly) refuses injected scripts.
      await page.evaluate(AXE);
      const violations = await page.evaluate(async () => {
        const result = await (window as any).axe.run(document, { resultTypes: ['violations'] });
        return result.violations.map((v: any) => `${v.id} (${v.impact}): ${v.nodes.map((n: any) => n.target.join(' ')).join(', ')}`);
      });
      assert.deepEqual(violations, [], `axe on the ${tab} tab`);
    }
    assert.deepEqual(watch.problems, []);
    assert.deepEqual(watch.offOrigin, []);
    assert.ok(watch.requests.some((r) => r.url === `${url}/console/vendor/uPlot.iife.min.js`), 'uPlot comes from this server');
    await page.close();
  });

  test('one click streams two columns at once; each final text equals /v1/generate for the same task and seed', async () => {
    const { page, watch } = await open('playground');
    await setUpRun(page, PROMPT, SAMPLED, ['alpha', 'beta']);
    await page.click('#run');
    await waitColumnsDone(page);
    const shown = await columnTexts(page);

    const generates = watch.requests.filter((r) => r.method === 'POST' && r.url === `${url}/v1/generate`).map((r) => JSON.parse(r.body!));
    assert.deepEqual(generates.map((b) => [b.task, b.stream, b.inputs]).sort(), [['alpha', true, PROMPT], ['beta', true, PROMPT]]);
    for (const [i, task] of ['alpha', 'beta'].entries()) {
      const ref = await post(`${url}/v1/generate`, { task, inputs: PROMPT, parameters: SAMPLED });
      assert.equal(shown[i].text, ref.generated_text, `column ${i + 1} (${task})`);
      // One SSE event per token reached the column.
      assert.equal(shown[i].tokens, ref.details.generated_tokens);
      assert.equal(shown[i].tokens, SAMPLED.max_new_tokens);
    }
    assert.notEqual(shown[0].text, shown[1].text, 'the two deltas diverge');
    await screenshot(page, 'desktop');
    assert.deepEqual(watch.problems, []);
    await page.close();
  });

  test('chat mode: two turns in two columns, each reply equal to /v1/chat/completions with the same history and seed', async () => {
    const { page, watch } = await open('playground');
    const backbone = await (await fetch(`${url}/v1/backbone`)).json();
    assert.equal(backbone.chat_template, true, 'demo:llama ships a chat template');
    await page.check('#mode-chat');
    assert.equal(await page.textContent('#prompt-label'), 'Message');
    const p = { ...SAMPLED, max_new_tokens: 12, temperature: 0.7, seed: 5 };
    await setUpRun(page, CHAT, p, ['alpha', 'beta']);
    const sampling = { max_tokens: p.max_new_tokens, temperature: p.temperature, top_k: 0, top_p: p.top_p, repetition_penalty: 1, seed: p.seed };
    const histories: { role: string; content: string }[][] = [[], []];
    for (const message of [CHAT, 'And then?']) {
      await page.fill('#prompt', message);
      await page.click('#run');
      await waitColumnsDone(page);
      assert.equal(await page.inputValue('#prompt'), '', 'the message box empties for the next turn');
      const replies = await columnTexts(page, '.turn.assistant pre');
      for (const [i, model] of ['alpha', 'beta'].entries()) {
        histories[i].push({ role: 'user', content: message });
        const ref = await post(`${url}/v1/chat/completions`, { model, messages: histories[i], ...sampling });
        assert.equal(replies[i].text, ref.choices[0].message.content, `column ${i + 1} (${model}), turn ${histories[i].length}`);
        histories[i].push({ role: 'assistant', content: ref.choices[0].message.content });
      }
    }
    const chats = watch.requests.filter((r) => r.url === `${url}/v1/chat/completions`).map((r) => JSON.parse(r.body!));
    assert.equal(chats.length, 4);
    assert.ok(chats.every((b) => b.stream === true));
    assert.deepEqual(watch.problems, []);
    await page.close();
  });

  test('deltas: register a folder through the page and run it in a column; a refused upload shows every problem; import, replace, delete', async () => {
    const { page, watch } = await open('deltas');
    await page.waitForSelector('#deltas-table tr[data-id="alpha"]');

    // A folder picked in the browser: its name becomes the task id.
    const gamma = await writeDelta(join(files.dir, 'gamma'), peftLora(info, 3, { rank: 4, targets: ['q_proj'] }));
    await page.setInputFiles('#pick-folder', gamma);
    assert.equal(await page.inputValue('#register-id'), 'gamma');
    await page.click('#register-form button[type="submit"]');
    await page.waitForSelector('#register-result .ok');
    await page.waitForSelector('#deltas-table tr[data-id="gamma"]');
    const listed = await (await fetch(`${url}/v1/deltas/gamma`)).json();
    assert.equal(listed.type, 'lora');

    // Files dropped on the drop zone, refused: the page lists exactly the problems the API lists.
    const bad = refusedLora(info);
    const refusal = await uploadDelta(url, 'bad', bad);
    assert.equal(refusal.status, 422);
    const expected = (await refusal.json()).error;
    assert.ok(expected.details.length >= 2, JSON.stringify(expected));
    await page.fill('#register-id', 'bad');
    await page.evaluate((dropped) => {
      const transfer = new DataTransfer();
      for (const f of dropped) transfer.items.add(new File([Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0))], f.name));
      document.getElementById('drop-zone')!.dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true }));
    }, Object.entries(bad).map(([name, content]) => ({ name, b64: content.toString('base64') })));
    await page.waitForFunction(() => document.querySelectorAll('#chosen-files li').length === 2);
    await page.click('#register-form button[type="submit"]');
    await page.waitForSelector('#register-result .error');
    assert.deepEqual(await page.$$eval('#register-result .problems li', (lis) => lis.map((li) => li.textContent)), expected.details);
    assert.match((await page.textContent('#register-result .error'))!, new RegExp(expected.code));
    assert.equal((await fetch(`${url}/v1/deltas/bad`)).status, 404, 'a refused delta leaves nothing behind');
    await screenshot(page, 'deltas');

    // Import by path, from inside DELTASERVE_IMPORT_DIR.
    await page.click('#register-form button[type="reset"]');
    await writeDelta(join(files.dir, 'import', 'delta-by-path'), peftLora(info, 4, { rank: 4, targets: ['v_proj'] }));
    await page.fill('#register-id', 'imported');
    await page.fill('#register-path', 'delta-by-path');
    await page.click('#register-form button[type="submit"]');
    await page.waitForSelector('#deltas-table tr[data-id="imported"]');

    // Replace gamma with other weights: the row's Replace button fills in the id and ticks replace.
    const before = listed.sha256;
    await page.click('button[aria-label="Replace gamma"]');
    assert.equal(await page.inputValue('#register-id'), 'gamma');
    assert.equal(await page.isChecked('#register-replace'), true);
    const gamma2 = await writeDelta(join(files.dir, 'gamma2'), peftLora(info, 5, { rank: 4, targets: ['q_proj'] }));
    await page.setInputFiles('#pick-files', ['adapter_config.json', 'adapter_model.safetensors'].map((f) => join(gamma2, f)));
    await page.click('#register-form button[type="submit"]');
    await page.waitForSelector('#register-result .ok');
    assert.notEqual((await (await fetch(`${url}/v1/deltas/gamma`)).json()).sha256, before, 'gamma was replaced');

    // Delete, after the confirmation dialog.
    page.once('dialog', (d) => void d.accept());
    await page.click('button[aria-label="Delete imported"]');
    await page.waitForSelector('#deltas-table tr[data-id="imported"]', { state: 'detached' });
    assert.equal((await fetch(`${url}/v1/deltas/imported`)).status, 404);

    // The registered delta is usable in a column, exactly as through the API.
    await page.click('#tab-playground');
    await setUpRun(page, PROMPT, GREEDY, ['gamma', 'alpha']);
    await page.click('#run');
    await waitColumnsDone(page);
    const [shown] = await columnTexts(page);
    const ref = await post(`${url}/v1/generate`, { task: 'gamma', inputs: PROMPT, parameters: GREEDY });
    assert.equal(shown.text, ref.generated_text);
    // The browser's own note on the refused upload's 422, and nothing else.
    assert.deepEqual(watch.problems, ['console.error: Failed to load resource: the server responded with a status of 422 (Unprocessable Entity)']);
    await page.close();
  });

  test('backbone view: the chosen delta highlights exactly the modules its config targets, folded and unfolded', async () => {
    const { page, watch } = await open('deltas');
    await page.click('button[aria-label="Show the sites of beta"]');
    await page.waitForSelector('#panel-backbone li.leaf.site');
    assert.equal(await page.inputValue('#site-delta'), 'beta');
    // beta: LoRA on o_proj and down_proj of layers 1 and 2 (layers_to_transform), computed here from that config.
    const expected = info.modules.filter((m) => /\.(o_proj|down_proj)$/.test(m.name) && (m.layer === 1 || m.layer === 2)).map((m) => m.name).sort();
    assert.equal(expected.length, 4);
    const leaves = () => page.$$eval('#module-tree li.leaf', (lis) => lis.map((li) => ({
      modules: (li as HTMLElement).dataset.modules!.split(' '), site: li.classList.contains('site'), text: li.textContent ?? '',
    })));

    const folded = await leaves();
    assert.deepEqual(folded.filter((l) => l.site).flatMap((l) => l.modules).sort(), expected);
    assert.deepEqual(folded.flatMap((l) => l.modules).sort(), info.modules.map((m) => m.name).sort(), 'every module exactly once');
    assert.ok(folded.filter((l) => l.site).every((l) => l.text.includes('lora r=4')));
    // Layers 1 and 2 carry the same sites and fold together, like OpenDelta's log(); 0 and 3 fold apart from them.
    const layerLabels = await page.$$eval('#module-tree .tree-root > li > details > ul > li > details > ul > li > details > summary .name', (s) => s.map((e) => e.textContent));
    assert.deepEqual(layerLabels, ['0', '1-2', '3']);
    await screenshot(page, 'backbone');

    await page.uncheck('#fold-layers');
    const unfolded = await leaves();
    assert.ok(unfolded.every((l) => l.modules.length === 1));
    assert.deepEqual(unfolded.filter((l) => l.site).map((l) => l.modules[0]).sort(), expected);

    await page.selectOption('#site-delta', 'alpha');
    await page.waitForFunction(() => document.querySelector('#site-summary strong')?.textContent === 'alpha');
    const alpha = (await leaves()).filter((l) => l.site).map((l) => l.modules[0]).sort();
    assert.deepEqual(alpha, info.modules.filter((m) => /\.(q_proj|v_proj)$/.test(m.name)).map((m) => m.name).sort());
    assert.deepEqual(watch.problems, []);
    await page.close();
  });

  test('live: the charts poll /metrics and show the tokens a generation made', async () => {
    const { page, watch } = await open('live');
    await page.selectOption('#live-interval', '1000');
    await page.waitForSelector('[data-chart="tokens"][data-points]');
    await post(`${url}/v1/generate`, { task: 'alpha', inputs: PROMPT, parameters: { ...GREEDY, max_new_tokens: 32 } });
    // Polling goes on, so some interval after the generation holds its tokens.
    await page.waitForFunction(() => Number(/max ([\d.]+)/.exec(document.querySelector('[data-chart="tokens"] .now')?.textContent ?? '')?.[1]) > 0);
    const charts = await page.$$eval('.chart', (figs) => figs.map((f) => ({
      id: (f as HTMLElement).dataset.chart, points: Number((f as HTMLElement).dataset.points), canvas: f.querySelector('canvas') !== null,
      now: f.querySelector('.now')?.textContent ?? '',
    })));
    assert.deepEqual(charts.map((c) => c.id), ['tokens', 'requests', 'batch', 'hit-ratio', 'cache-bytes', 'kv']);
    for (const c of charts) {
      assert.ok(c.points >= 2 && c.canvas, JSON.stringify(c));
    }
    assert.doesNotMatch(charts.find((c) => c.id === 'cache-bytes')!.now, /max 0 B/, 'a delta was loaded into the cache');
    if (SHOTS) {
      // Some history for the picture: staggered requests over several seconds.
      const running: Promise<unknown>[] = [];
      for (let i = 0; i < 10; i++) {
        running.push(post(`${url}/v1/generate`, { task: ['alpha', 'beta', 'gamma', info.name][i % 4], inputs: PROMPT, parameters: { ...GREEDY, max_new_tokens: 300 + 60 * i } }));
        await page.waitForTimeout(600);
      }
      await Promise.all(running);
      await page.waitForTimeout(2500);
    }
    await screenshot(page, 'live');
    assert.deepEqual(watch.problems, []);
    await page.close();
  });

  test('Stop cancels every column mid-stream, and the server frees their rows', async () => {
    const { page, watch } = await open('playground');
    // Long enough that the columns are still streaming when Stop is clicked.
    await setUpRun(page, PROMPT, { ...GREEDY, max_new_tokens: 900 }, ['alpha', 'beta']);
    await page.click('#run');
    await page.waitForFunction(() => [...document.querySelectorAll<HTMLElement>('.column')].every((c) => Number(c.dataset.tokens) > 0));
    await page.click('#stop');
    await page.waitForFunction(() => [...document.querySelectorAll<HTMLElement>('.column')].every((c) => c.dataset.state === 'stopped'));
    assert.equal(await page.textContent('#run-state'), 'stopped');
    assert.equal(await page.isEnabled('#run'), true);
    await waitFor('the engine to drop the cancelled rows', async () =>
      /^deltaserve_num_requests_running 0$/m.test(await (await fetch(`${url}/metrics`)).text()));
    assert.deepEqual(watch.problems, []);
    await page.close();
  });

  test('at 360 px nothing overflows sideways, and the keyboard alone runs the playground and moves between tabs', async () => {
    const { page, watch } = await open('playground', { width: 360, height: 780 });
    for (const tab of ['backbone', 'deltas', 'live', 'playground']) {
      await page.click(`#tab-${tab}`);
      if (tab === 'deltas') await page.waitForSelector('#deltas-table tr[data-id="alpha"]');
      const width = await page.evaluate(() => document.documentElement.scrollWidth);
      assert.ok(width <= 360, `the ${tab} tab is ${width} px wide at a 360 px viewport`);
      if (tab === 'deltas') await screenshot(page, 'narrow-deltas');
    }
    // Tab from the top of the page to the prompt, type, Ctrl+Enter.
    await page.evaluate(() => (document.activeElement as HTMLElement | null)?.blur());
    let presses = 0;
    while ((await page.evaluate(() => document.activeElement?.id)) !== 'prompt') {
      assert.ok(++presses < 40, 'the prompt is reachable with Tab');
      await page.keyboard.press('Tab');
    }
    await page.keyboard.type(PROMPT);
    await page.keyboard.press('Control+Enter');
    await page.waitForSelector('.column[data-state="streaming"], .column[data-state="done"]');
    await waitColumnsDone(page);
    await screenshot(page, 'narrow');

    await page.focus('#tab-playground');
    await page.keyboard.press('ArrowRight');
    assert.equal(await page.isVisible('#panel-backbone'), true);
    assert.equal(await page.evaluate(() => document.activeElement?.id), 'tab-backbone');
    await page.keyboard.press('End');
    assert.equal(await page.isVisible('#panel-live'), true);
    assert.deepEqual(watch.problems, []);
    await page.close();
  });

  test('the admin token: a 401 asks for it, it is kept in this tab\'s session storage across reloads, and not in other tabs', async () => {
    const secured = await startStack({
      env: { DELTASERVE_MODEL: 'demo:llama', DELTASERVE_ADMIN_TOKEN: TOKEN },
      cacheDir: join(stack.dir, 'cache'),
    });
    const listening = await listenOn(secured.services.app);
    try {
      assert.equal((await uploadDelta(listening.url, 'guarded', peftLora(info, 6, { rank: 4, targets: ['q_proj'] }), { authorization: `Bearer ${TOKEN}` })).status, 201);
      const page = await browser.context.newPage();
      const watch = watchPage(page, listening.url);
      await page.goto(`${listening.url}/#deltas`);
      await page.waitForSelector('#deltas-error .error');
      assert.match((await page.textContent('#deltas-error'))!, /unauthorized[\s\S]*Enter the admin token/);

      await page.fill('#admin-token', TOKEN);
      await page.press('#admin-token', 'Enter');
      await page.waitForSelector('#deltas-table tr[data-id="guarded"]');
      assert.equal(await page.inputValue('#admin-token'), '', 'the token is not shown back');

      await page.reload();
      await page.waitForSelector('#deltas-table tr[data-id="guarded"]');
      const lists = watch.requests.filter((r) => r.url === `${listening.url}/v1/deltas`);
      assert.equal(lists.at(-1)!.headers.authorization, `Bearer ${TOKEN}`);
      assert.ok(!watch.requests.some((r) => r.url.endsWith('/v1/generate') && r.headers.authorization), 'the token goes to admin routes only');
      // The only console errors are the browser's own notes on the two expected 401s.
      assert.ok(watch.problems.every((p) => /401 \(Unauthorized\)/.test(p)), watch.problems.join('\n'));

      const other = await browser.context.newPage();
      await other.goto(`${listening.url}/#deltas`);
      await other.waitForSelector('#deltas-error .error');
      await other.close();
      await page.close();
    } finally {
      await listening.close();
      await secured.close();
    }
  });

  test('no prompt text reaches the server log or the browser console', () => {
    assert.ok(logLines.length > 20, 'the server logged at debug level throughout');
    for (const text of [PROMPT, CHAT, 'And then?']) {
      assert.ok(!logLines.some((l) => l.includes(text)), `the log holds "${text}"`);
      assert.ok(!watches.some((w) => w.messages.some((m) => m.includes(text))), `the browser console holds "${text}"`);
    }
  });
});
