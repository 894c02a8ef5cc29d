/** ORT sessions on the configured execution provider. */
import * as ort from 'onnxruntime-node';

export type ExecutionProvider = 'cpu' | 'cuda';

/**
 * Whether a provider takes zero-size input tensors. Only the CPU provider is
 * known to: WebGPU crashes on them, and the CUDA path is not verified on a GPU
 * yet, so it gets the rank-1 form of an unused delta site too.
 */
export const takesZeroSizeTensors = (ep: ExecutionProvider) => ep === 'cpu';

export interface SessionOptions {
  ep?: ExecutionProvider;
  /** Intra-op threads; default lets ORT use every core. */
  threads?: number;
}

export class ProviderUnavailableError extends Error {
  override name = 'ProviderUnavailableError';
}

const CUDA_HINT =
  'the CUDA execution provider is not installed: reinstall onnxruntime-node with ' +
  '`npm install onnxruntime-node --onnxruntime-node-install=cuda12` (needs network access to its CUDA binaries) ' +
  'on a machine with CUDA 12 and cuDNN 9, or use the image in deploy/ (DELTASERVE_EP=cuda); set DELTASERVE_EP=cpu to run on the CPU';

export async function createSession(model: Uint8Array | string, opts: SessionOptions = {}): Promise<ort.InferenceSession> {
  const ep = opts.ep ?? 'cpu';
  const options: ort.InferenceSession.SessionOptions = {
    executionProviders: ep === 'cuda' ? ['cuda'] : ['cpu'],
    graphOptimizationLevel: 'all',
    logSeverityLevel: 3,
    ...(opts.threads ? { intraOpNumThreads: opts.threads } : {}),
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
    throw e;
  }
}
