import type { z } from 'zod';
import { ServeError } from '../errors.js';

/**
 * Collects every reason a delta is refused, so one 422 can list them all
 * instead of making the user fix and re-upload one problem at a time.
 */
export class Problems {
  private readonly items: { text: string; unsupported: boolean }[] = [];

  /** The delta is malformed or does not fit the backbone. */
  invalid(text: string): void {
    this.items.push({ text, unsupported: false });
  }

  /** The delta is well-formed but uses a feature deltaserve does not serve. */
  unsupported(text: string): void {
    this.items.push({ text, unsupported: true });
  }

  get count(): number {
    return this.items.length;
  }

  /** Unsupported wins over invalid: fixing the values would not help a delta whose kind we cannot serve. */
  toError(subject: string): ServeError {
    const [first] = this.items;
    const more = this.items.length - 1;
    const message =
      `${subject} refused: ${first.text}` +
      (more > 0 ? ` (and ${more} more problem${more > 1 ? 's' : ''}; see details)` : '');
    const code = this.items.some((p) => p.unsupported) ? 'unsupported_delta' : 'invalid_delta';
    return new ServeError(422, code, message, this.items.map((p) => p.text));
  }

  throwIfAny(subject: string): void {
    if (this.items.length > 0) throw this.toError(subject);
  }

  /** For problems after which nothing more can be checked (an unreadable config). */
  fail(subject: string, text: string, unsupported = false): never {
    if (unsupported) this.unsupported(text);
    else this.invalid(text);
    throw this.toError(subject);
  }
}

/** Reads a config with a zod schema, one problem per issue; null if there was any. `file` names it in messages. */
export function readSchema<T>(schema: z.ZodType<T>, value: unknown, file: string, problems: Problems): T | null {
  const parsed = schema.safeParse(value);
  if (parsed.success) return parsed.data;
  for (const issue of parsed.error.issues) problems.invalid(`${file}: ${issue.path.map(String).join('.') || '(root)'}: ${issue.message}`);
  return null;
}
