/**
 * Module-name matching shared by the formats and validation. PEFT, OpenDelta
 * and ONNX exporters all write module paths as dot-separated segments, but a
 * wrapper may add or drop a prefix (`base_model.model.`, `model.`), so names
 * are compared on whole segments from the end.
 */
import { RE2JS } from 're2js';

/** True when `suffix` equals `path` or ends it on a segment boundary (`attn.c_proj` ends `h.0.attn.c_proj`, `proj` does not). */
export function endsWithSegments(path: string, suffix: string): boolean {
  return path === suffix || (path.endsWith(suffix) && path[path.length - suffix.length - 1] === '.');
}

/** Either name is a segment suffix of the other. */
export function sameModule(a: string, b: string): boolean {
  return endsWithSegments(a, b) || endsWithSegments(b, a);
}

/** Every segment prefix of a path, shortest first: `a`, `a.b`, `a.b.c`. */
export function segmentPrefixes(path: string): string[] {
  const parts = path.split('.');
  return parts.map((_, i) => parts.slice(0, i + 1).join('.'));
}

/** A compiled user regex: only whether it matches, which is all module selection needs. */
export interface NameMatcher {
  test(name: string): boolean;
}

/**
 * Compiles a user-supplied regex (a delta's config) with RE2's linear-time
 * engine, so no pattern can hang the server with catastrophic backtracking
 * (`(.*.*)*X`). RE2 has no backreferences or lookaround: such a pattern is
 * refused with the reason instead of being run by a backtracking engine.
 * Returns the problem as a string instead of throwing.
 */
export function compileRegex(source: string, anchored: boolean): NameMatcher | string {
  try {
    const re = RE2JS.compile(anchored ? `^(?:${source})$` : source);
    return { test: (name) => re.matcher(name).find() };
  } catch (err) {
    return `'${source}' is not a valid regular expression for RE2, the linear-time engine deltaserve runs user regexes with ` +
      `(no backreferences or lookaround): ${(err as Error).message}`;
  }
}
