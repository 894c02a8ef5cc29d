/**
 * The console's static files as HTTP serves them (the browser tests in
 * console.test.ts run the page itself): the page at /, its modules and uPlot
 * from this server only, under a CSP that lets nothing else in.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import request from 'supertest';
import { createChatTemplate } from '../src/http/chat-template.js';
import { testApp } from './helpers/http-app.js';

test('GET / serves the console under a same-origin-only CSP; its modules and uPlot come from /console/', async () => {
  const { app } = testApp();
  const page = await request(app).get('/').expect(200);
  assert.match(page.headers['content-type'], /^text\/html/);
  const csp = page.headers['content-security-policy'];
  assert.match(csp, /default-src 'none'/);
  assert.match(csp, /script-src 'self'(;|$)/);
  assert.match(csp, /connect-src 'self'(;|$)/);
  assert.doesNotMatch(page.text, /(src|href)="(https?:)?\/\//, 'nothing from another host');
  const assets = [...page.text.matchAll(/(?:src|href)="([^"#][^"]*)"/g)].map((m) => m[1]);
  assert.ok(assets.length >= 5, assets.join(' '));
  for (const asset of assets) {
    assert.match(asset, /^\/console\//, 'every asset is served by this server');
    const res = await request(app).get(asset).expect(200);
    assert.equal(res.headers['x-content-type-options'], 'nosniff', asset);
  }
  const main = await request(app).get('/console/main.js').expect(200);
  assert.match(main.headers['content-type'], /javascript/);
});

test('unknown console paths are a JSON 404, and nothing else of node_modules is reachable', async () => {
  const { app } = testApp();
  for (const path of ['/console/nope.js', '/console/vendor/package.json', '/console/../package.json', '/console/vendor/../../package.json']) {
    const res = await request(app).get(path);
    assert.equal(res.status, 404, path);
    assert.equal(res.body.error.code, 'not_found', path);
  }
});

test('GET /v1/backbone says whether the model ships its own chat template', async () => {
  const fallback = await request(testApp().app).get('/v1/backbone').expect(200);
  assert.equal(fallback.body.chat_template, false);
  const own = await request(testApp({ chatTemplate: createChatTemplate({ template: '{{ messages[0].content }}' }) }).app).get('/v1/backbone').expect(200);
  assert.equal(own.body.chat_template, true);
});
