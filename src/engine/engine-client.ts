/** The main thread's handle on the engine worker. */
import { EventEmitter } from 'node:events';
import { Worker } from 'node:worker_threads';
import type { LoadedDelta } from '../deltas/types.js';
import type { EngineInit, FromEngine, RowRequest, RunPhase, StepResult, ToEngine } from './protocol.js';

/**
 * Delta tensors are copied once into shared memory, so every request that
 * carries the delta to the worker shares it instead of cloning megabytes.
 */
const shared = new WeakMap<LoadedDelta, LoadedDelta>();

function toShared(a: Float32Array): Float32Array {
  if (a.buffer instanceof SharedArrayBuffer) return a;
  const out = new Float32Array(new SharedArrayBuffer(a.byteLength));
  out.set(a);
  return out;
}

export function shareDelta(delta: LoadedDelta): LoadedDelta {
  let s = shared.get(delta);
  if (!s) {
    s = {
      ...delta,
      sites: delta.sites.map((site) => ({
        ...site,
        data: Object.fromEntries(Object.entries(site.data).map(([key, d]) => [key, toShared(d)])),
      })),
    };
    shared.set(delta, s);
  }
  return s;
}

export interface EngineClientEvents {
  step: [StepResult];
  error: [message: string, rowIds: number[]];
}

export class EngineClient extends EventEmitter<EngineClientEvents> {
  private constructor(private readonly worker: Worker) {
    super();
  }

  static start(init: EngineInit): Promise<EngineClient> {
    // The worker is TypeScript too. Node 20 applies --import loaders to a worker's imports but not
    // to its entry file, so a one-line bootstrap registers tsx and then imports the worker.
    const api = JSON.stringify(import.meta.resolve('tsx/esm/api'));
    const entry = JSON.stringify(new URL('./worker.ts', import.meta.url).href);
    const worker = new Worker(`import(${api}).then(({ register }) => { register(); return import(${entry}); })`, { eval: true });
    const client = new EngineClient(worker);
    return new Promise((resolve, reject) => {
      const onMessage = (m: FromEngine) => {
        if (m.type === 'ready') {
          worker.off('message', onMessage);
          worker.on('message', (msg: FromEngine) => client.dispatch(msg));
          resolve(client);
        } else if (m.type === 'error') {
          worker.off('message', onMessage);
          void worker.terminate();
          reject(new Error(m.message));
        }
      };
      worker.on('message', onMessage);
      worker.once('error', reject);
      // A model of its own buffer moves to the worker instead of being copied.
      const { model } = init;
      const movable = typeof model !== 'string' && model.byteOffset === 0 && model.byteLength === model.buffer.byteLength;
      worker.postMessage({ type: 'init', init } satisfies ToEngine, movable ? [model.buffer as ArrayBuffer] : []);
    });
  }

  private dispatch(m: FromEngine): void {
    if (m.type === 'step') this.emit('step', m.result);
    else if (m.type === 'error') this.emit('error', m.message, m.rowIds);
  }

  add(row: RowRequest): void {
    const msg: ToEngine = { type: 'add', row: { ...row, delta: row.delta ? shareDelta(row.delta) : null } };
    this.worker.postMessage(msg);
  }

  cancel(rowId: number): void {
    this.worker.postMessage({ type: 'cancel', rowId } satisfies ToEngine);
  }

  /** Test-only fault hook (DELTASERVE_FAULTS=engine-step): the engine's next `runs` session runs (of `phase`, or any) fail. */
  injectRunFaults(runs: number, phase: RunPhase | 'any' = 'any'): void {
    this.worker.postMessage({ type: 'fault', runs, phase } satisfies ToEngine);
  }

  async close(): Promise<void> {
    await this.worker.terminate();
  }
}
