/** ORT sessions on the configured execution provider. */
import * as ort from 'onnxruntime-node';

import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export type ExecutionProvider = 'cpu' | 'cuda' | 'webgpu';

/**
 * Whether a provider takes zero-size input tensors. Only the CPU provider is
 * known to: WebGPU crashes on zero-size delta banks (onnxruntime-node 1.30),
 * and the CUDA path is not verified on a GPU yet, so both get the rank-1 form
 * of an unused delta site.
 */
export const takesZeroSizeTensors = (ep: ExecutionProvider) => ep === 'cpu';

export interface SessionOptions {
  ep?: ExecutionProvider;
  /** Intra-op threads; default lets ORT use every core. */
  threads?: number;
  /** On WebGPU: where outputs go (`gpu-buffer` stays on the device). */
  outputLocations?: 'cpu' | 'gpu-buffer';
}

/** Dawn (the WebGPU provider) wants XDG_RUNTIME_DIR; a service often has none. */
export function ensureRuntimeDir(): void {
  process.env.XDG_RUNTIME_DIR ??= mkdtempSync(join(tmpdir(), 'deltaserve-xdg-'));
}

const WEBGPU_HINT =
  'the WebGPU execution provider found no adapter: it needs a Vulkan driver (a GPU\'s, or Mesa\'s lavapipe: ' +
  '`mesa-vulkan-drivers` 25 from bookworm-backports and `libvulkan1`, see scripts/ci-setup.sh); set DELTASERVE_EP=cpu to run on the CPU';

export class ProviderUnavailableError extends Error {
  override name = 'ProviderUnavailableError';
}

const CUDA_HINT =
  'the CUDA execution provider is not installed: reinstall onnxruntime-node with ' +
  '`npm install onnxruntime-node --onnxruntime-node-install=cuda12` (needs network access to its CUDA binaries) ' +
  'on a machine with CUDA 12 and cuDNN 9, or use the image in deploy/ (DELTASERVE_EP=cuda); set DELTASERVE_EP=cpu to run on the CPU';

export async function createSession(model: Uint8Array | string, opts: SessionOptions = {}): Promise<ort.InferenceSession> {
  const ep = opts.ep ?? 'cpu';
  if (ep === 'webgpu') ensureRuntimeDir();
  const options: ort.InferenceSession.SessionOptions = {
    executionProviders: [ep],
    graphOptimizationLevel: 'all',
    logSeverityLevel: 3,
    ...(opts.threads ? { intraOpNumThreads: opts.threads } : {}),
    ...(ep === 'webgpu' && opts.outputLocations ? { preferredOutputLocation: opts.outputLocations } : {}),
  };
  try {
    return typeof model === 'string'
      ? await ort.InferenceSession.create(model, options)
      : await ort.InferenceSession.create(model, options);
  } catch (e) {
    const msg = String((e as Error).message ?? e);
    if (ep === 'cuda' && /cuda|provider|libonnxruntime_providers|cudnn|cublas/i.test(msg)) {
      throw new ProviderUnavailableError(`${CUDA_HINT} (onnxruntime said: ${msg.split('\n')[0]})`);
    }
    if (ep === 'webgpu' && /webgpu|adapter|dawn|vulkan/i.test(msg)) {
      throw new ProviderUnavailableError(`${WEBGPU_HINT} (onnxruntime said: ${msg.split('\n')[0]})`);
    }
    throw e;
  }
}
