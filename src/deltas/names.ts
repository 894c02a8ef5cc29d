/**
 * Module-name matching shared by the formats and validation. PEFT, OpenDelta
 * and ONNX exporters all write module paths as dot-separated segments, but a
 * wrapper may add or drop a prefix (`base_model.model.`, `model.`), so names
 * are compared on whole segments from the end.
 */

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

/** Compiles a user-supplied regex, reporting a bad one instead of throwing. */
export function compileRegex(source: string, anchored: boolean): RegExp | string {
  try {
    return new RegExp(anchored ? `^(?:${source})$` : source);
  } catch (err) {
    return `'${source}' is not a valid regular expression: ${(err as Error).message}`;
  }
}
