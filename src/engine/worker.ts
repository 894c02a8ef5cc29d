/**
 * The engine's thread. onnxruntime-node runs a session synchronously on the
 * calling thread, so the engine lives here and the main thread stays free for
 * HTTP, SSE and /metrics while every core computes.
 */
import { parentPort } from 'node:worker_threads';
import { createSession, takesZeroSizeTensors } from '../backbone/session.js';
import { deviceFor, outputLocations } from './device/index.js';
import { Engine } from './engine.js';
import type { EngineInit, FromEngine, ToEngine } from './protocol.js';

const port = parentPort!;
const post = (m: FromEngine) => port.postMessage(m);

let engine: Engine | null = null;
let wake: (() => void) | null = null;
let running = false;

async function init(init: EngineInit): Promise<void> {
  const session = await createSession(init.model, { ep: init.ep, threads: init.threads, outputLocations: outputLocations(init.ep) });
  engine = new Engine(session, init.io, init.sites, {
    maxBatch: init.maxBatch,
    prefillChunkTokens: init.prefillChunkTokens,
    eosTokenIds: init.eosTokenIds,
    maxPositions: init.maxPositions,
    zeroSizeTensors: takesZeroSizeTensors(init.ep),
    device: deviceFor(init.ep, init.io.layers),
  });
  post({ type: 'ready' });
}

/** Steps while there is work; yields to the event loop between steps so adds and cancels land. */
async function loop(): Promise<void> {
  if (running || !engine) return;
  running = true;
  try {
    for (;;) {
      if (engine.idle) {
        await new Promise<void>((resolve) => (wake = resolve));
        wake = null;
        continue;
      }
      try {
        const result = await engine.step();
        post({ type: 'step', result });
      } catch (e) {
        // A failed run fails its own rows inside step(); this is the last resort for anything else:
        // one bad step must not take the server down, so every row fails and the engine goes on.
        const rowIds = engine.rowIds();
        post({ type: 'error', message: (e as Error).message, rowIds });
        for (const rowId of rowIds) engine.cancel(rowId);
      }
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  } finally {
    running = false;
  }
}

port.on('message', (m: ToEngine) => {
  switch (m.type) {
    case 'init':
      init(m.init).then(loop, (e) => post({ type: 'error', message: `engine failed to start: ${(e as Error).message}`, rowIds: [] }));
      return;
    case 'add':
      engine!.add(m.row);
      break;
    case 'cancel':
      engine!.cancel(m.rowId);
      break;
    case 'fault':
      engine!.injectRunFaults(m.runs, m.phase);
      break;
  }
  wake?.();
});
