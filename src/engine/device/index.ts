/** The device an execution provider's engine keeps its per-row memory on. */
import { newKvName } from '../../backbone/rewrite/kv-cache.js';
import type { ExecutionProvider } from '../../backbone/session.js';
import { HostDevice } from './cpu.js';
import type { Device } from './device.js';
import { WebGpuDevice } from './webgpu.js';

/** `layers`: the backbone's layer count (a device moves all layers' K/V in one run). */
export function deviceFor(ep: ExecutionProvider, layers: number): Device {
  return ep === 'webgpu' ? new WebGpuDevice(2 * layers) : new HostDevice(ep);
}

/** Outputs of the engine graph that stay on the device under `ep`: the step's new K/V and the logits. */
export function deviceOutputs(ep: ExecutionProvider, layers: number): string[] | undefined {
  if (ep !== 'webgpu') return undefined;
  return [...Array.from({ length: layers }, (_, l) => [newKvName(l, 'key'), newKvName(l, 'value')]).flat(), 'logits'];
}
