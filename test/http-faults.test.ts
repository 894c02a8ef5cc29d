/**
 * The test-only fault hooks (DELTASERVE_FAULTS) are off unless named: no route
 * exists without them, an unknown name is refused at startup. What the
 * engine-step hook does to a real engine is the reliability suite's category
 * "faults (an engine step that throws)" (test/reliability/server.ts, run by
 * test/reliability.test.ts).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import express from 'express';
import request from 'supertest';
import { ConfigError, loadConfig } from '../src/config.js';
import { errorHandler } from '../src/http/errors.js';
import { faultRoutes } from '../src/http/routes/faults.js';
import { createLogger } from '../src/log.js';
import { testApp } from './helpers/http-app.js';

test('DELTASERVE_FAULTS: empty by default, engine-step when named, anything else refused with the list', () => {
  assert.deepEqual(loadConfig({}).faults, []);
  assert.deepEqual(loadConfig({ DELTASERVE_FAULTS: 'engine-step' }).faults, ['engine-step']);
  assert.throws(() => loadConfig({ DELTASERVE_FAULTS: 'engine-step,disk' }), (e: unknown) => e instanceof ConfigError && /unknown fault "disk".*engine-step/.test(e.message));
});

test('without DELTASERVE_FAULTS there is no fault route', async () => {
  const { app } = testApp();
  const r = await request(app).post('/v1/faults/engine-step').send({ runs: 1 });
  assert.equal(r.status, 404);
  assert.equal(r.body.error.code, 'not_found');
});

test('the engine-step route arms the hook with runs and phase, behind admin auth, and refuses a bad body', async () => {
  const armed: [number, string][] = [];
  const hooks = { engineStep: (runs: number, phase: string) => void armed.push([runs, phase]) };
  const app = express().use(express.json()).use(faultRoutes(hooks, (_req, _res, next) => next())).use(errorHandler(createLogger('silent')));
  assert.deepEqual((await request(app).post('/v1/faults/engine-step').send({}).expect(202)).body, { armed: 1, phase: 'any' });
  await request(app).post('/v1/faults/engine-step').send({ runs: 3, phase: 'decode' }).expect(202);
  assert.deepEqual(armed, [[1, 'any'], [3, 'decode']]);
  const denied = express().use(express.json()).use(faultRoutes(hooks, (_req, res) => void res.status(403).end()));
  await request(denied).post('/v1/faults/engine-step').send({}).expect(403);
  assert.equal(armed.length, 2);
  const bad = await request(app).post('/v1/faults/engine-step').send({ runs: 0, phase: 'sometimes' });
  assert.equal(bad.status, 400);
  assert.match(bad.body.error.message, /runs.*phase|phase.*runs/s);
  assert.equal(armed.length, 2);
});
