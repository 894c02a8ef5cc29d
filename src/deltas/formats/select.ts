/**
 * Decides a delta's format from the names of its files and which of them are
 * the delta. Other uploaded files (a tokenizer, a README) are not stored.
 */
import type { DeltaFormat } from '../types.js';
import { Problems } from '../problems.js';
import { OPENDELTA_CONFIG, PEFT_CONFIG, PEFT_WEIGHTS } from './files.js';

export interface Selection {
  format: DeltaFormat;
  /** The files to read, parse and store. */
  keep: string[];
  weights: string;
}

const PICKLE = /\.(bin|pt|pth|ckpt|pkl)$/;

function convertHint(pickle: string, target: string): string {
  return (
    `convert it to safetensors and upload ${target} instead: ` +
    `python -c "import torch; from safetensors.torch import save_file; ` +
    `sd = torch.load('${pickle}', map_location='cpu', weights_only=True); ` +
    `save_file({k: v.contiguous() for k, v in sd.items()}, '${target}')"`
  );
}

export function selectFiles(names: string[], subject: string): Selection {
  const problems: Problems = new Problems();
  const has = new Set(names);
  const pickles = names.filter((n) => PICKLE.test(n));

  if (has.has(PEFT_CONFIG)) {
    if (!has.has(PEFT_WEIGHTS)) {
      if (pickles.length > 0) {
        problems.fail(
          subject,
          `${pickles[0]} is a pickle, which can run code when loaded, so deltaserve never reads it; ${convertHint(pickles[0], PEFT_WEIGHTS)}`,
          true,
        );
      }
      problems.fail(subject, `${PEFT_CONFIG} is there but ${PEFT_WEIGHTS} is missing; upload both`);
    }
    return { format: 'peft', keep: [PEFT_CONFIG, PEFT_WEIGHTS], weights: PEFT_WEIGHTS };
  }

  if (has.has(OPENDELTA_CONFIG)) {
    const weights = names.filter((n) => n.endsWith('.safetensors'));
    if (weights.length === 0) {
      if (pickles.length > 0) {
        problems.fail(
          subject,
          `${pickles[0]} is a pickle (OpenDelta saves pytorch_model.bin), which can run code when loaded, so deltaserve never reads it; ${convertHint(pickles[0], 'model.safetensors')}`,
          true,
        );
      }
      problems.fail(subject, `${OPENDELTA_CONFIG} is there but no .safetensors weights file; upload the delta's weights as safetensors`);
    }
    if (weights.length > 1) {
      problems.fail(subject, `found ${weights.length} .safetensors files (${weights.join(', ')}); an OpenDelta delta has exactly one`);
    }
    return { format: 'opendelta', keep: [OPENDELTA_CONFIG, weights[0]], weights: weights[0] };
  }

  return problems.fail(
    subject,
    `cannot tell the delta's format from its files (${names.join(', ') || 'none'}): expected ${PEFT_CONFIG} + ${PEFT_WEIGHTS} (PEFT) or ${OPENDELTA_CONFIG} + a .safetensors file (OpenDelta)`,
  );
}
