/** The device an execution provider's engine keeps its per-row memory on. */
import { LOGITS_NONFINITE } from '../../backbone/rewrite/finite-check.js';
import { GREEDY_TOKEN } from '../../backbone/rewrite/last-logits.js';
import { LOGSUMEXP, TOP_LOGPROB_IDS, TOP_LOGPROBS } from '../../backbone/rewrite/logprobs.js';
import type { ExecutionProvider } from '../../backbone/session.js';
import { HostDevice } from './cpu.js';
import type { Device } from './device.js';
import { WebGpuDevice } from './webgpu.js';

/** `layers`: the backbone's layer count (a device moves all layers' K/V in one run). */
export function deviceFor(ep: ExecutionProvider, layers: number): Device {
  return ep === 'webgpu' ? new WebGpuDevice(2 * layers, HOST_OUTPUTS) : new HostDevice(ep);
}

/**
 * Where the engine graph's outputs go under `ep` (WebGPU only): all stay on
 * the device. onnxruntime-node 1.30 applies a per-output location map by the
 * position of an output among the fetched names, not by its name (a step that
 * fetches a subset gets outputs on the wrong side), so the map is one value
 * for all, and the device downloads the small outputs the engine reads
 * (HOST_OUTPUTS) with a graph of its own.
 */
export function outputLocations(ep: ExecutionProvider): 'gpu-buffer' | undefined {
  return ep === 'webgpu' ? 'gpu-buffer' : undefined;
}

/** Outputs of the engine graph the engine reads on the host. */
export const HOST_OUTPUTS = [GREEDY_TOKEN, LOGITS_NONFINITE, TOP_LOGPROBS, TOP_LOGPROB_IDS, LOGSUMEXP];
