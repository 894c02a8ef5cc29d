/**
 * JSON.parse keeps the last of two equal keys silently, so `{"id":"a","id":"b"}`
 * would register `b` while the client may think it sent `a`. This scan finds
 * the first key that appears twice in one object, in one linear pass (strings
 * are skipped with indexOf, so a multi-megabyte prompt costs little).
 */

/** Index just past the string that starts at `start` (a `"`). */
function stringEnd(text: string, start: number): number {
  let i = start + 1;
  for (;;) {
    const q = text.indexOf('"', i);
    if (q < 0) return text.length;
    let slashes = 0;
    for (let j = q - 1; text.charCodeAt(j) === 92; j--) slashes++;
    if (slashes % 2 === 0) return q + 1;
    i = q + 1;
  }
}

/** The first key that appears twice in one object of `text` (valid JSON), or null. */
export function duplicateKey(text: string): string | null {
  // One entry per open object (its keys) or array (null); `key` says whether a string here is a key.
  const stack: (Set<string> | null)[] = [];
  let key = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 34 /* " */) {
      const end = stringEnd(text, i);
      const keys = stack[stack.length - 1];
      if (key && keys) {
        const name = JSON.parse(text.slice(i, end)) as string;
        if (keys.has(name)) return name;
        keys.add(name);
        key = false;
      }
      i = end - 1;
    } else if (c === 123 /* { */) {
      stack.push(new Set());
      key = true;
    } else if (c === 91 /* [ */) {
      stack.push(null);
    } else if (c === 125 /* } */ || c === 93 /* ] */) {
      stack.pop();
    } else if (c === 44 /* , */) {
      key = stack[stack.length - 1] instanceof Set;
    }
  }
  return null;
}
