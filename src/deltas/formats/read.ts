/** What both formats do alike: read the config's JSON, and sort the weights' tensors by module for the kind. */
import type { Tensor } from '../candidate.js';
import type { FormatBinding } from '../kinds/kind.js';
import type { Problems } from '../problems.js';
import { parseSafetensors } from '../safetensors.js';

export function readConfig(bytes: Uint8Array, file: string, problems: Problems, subject: string): unknown {
  try {
    return JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch (err) {
    return problems.fail(subject, `${file} is not valid JSON: ${(err as Error).message}`);
  }
}

/**
 * Module name (as the file writes it) → part → tensor, by the kind's key
 * names. A key that is not one of the kind's is refused, naming `what` the
 * delta is and with the format's `advice` about tensors saved beside it.
 */
export function groupTensors(
  bytes: Uint8Array, file: string, binding: FormatBinding<unknown>, problems: Problems, subject: string,
  foreign: { what: string; advice: string }, keyOf: (name: string) => string = (n) => n,
): Map<string, Map<string, Tensor>> {
  const st = parseSafetensors(bytes, file, problems, subject);
  const modules = new Map<string, Map<string, Tensor>>();
  for (const info of st.tensors.values()) {
    const m = binding.key(keyOf(info.name));
    if (!m) {
      problems.unsupported(`tensor '${info.name}' is not a parameter of ${foreign.what} (expected ${binding.expected}); ${foreign.advice}`);
      continue;
    }
    if ('refused' in m) {
      problems.unsupported(m.refused);
      continue;
    }
    const parts = modules.get(m.module) ?? new Map<string, Tensor>();
    parts.set(m.part, { name: info.name, shape: info.shape, data: st.read(info.name) });
    modules.set(m.module, parts);
  }
  return modules;
}
