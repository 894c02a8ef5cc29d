/**
 * Imports by path: the server reads a delta folder from its own disk, so the
 * folder must lie inside DELTASERVE_IMPORT_DIR, by its real path. `..` is
 * refused outright; symlinks are followed only to see where they land, and
 * anything that lands outside is refused before a byte of it is read.
 */
import { readdir, realpath, stat } from 'node:fs/promises';
import { isAbsolute, join, relative, resolve, sep } from 'node:path';
import type { DeltaFile } from '../deltas/types.js';
import { ServeError } from '../errors.js';

const forbidden = (message: string) => new ServeError(403, 'forbidden', message);

const inside = (root: string, p: string) => {
  const rel = relative(root, p);
  return rel === '' || (rel !== '..' && !rel.startsWith(`..${sep}`) && !isAbsolute(rel));
};

export async function resolveImport(importDir: string | null, requested: string): Promise<DeltaFile[]> {
  if (importDir === null) {
    throw forbidden('imports by path are disabled: set DELTASERVE_IMPORT_DIR (--import-dir) to the folder deltas may be imported from, or upload the files as multipart/form-data');
  }
  if (requested.includes('\0')) throw new ServeError(400, 'bad_request', 'path contains a NUL byte');
  if (requested.split(/[/\\]/).includes('..')) throw forbidden('path must not contain ".." segments');

  const lexicalRoot = resolve(importDir);
  let root: string;
  try {
    root = await realpath(lexicalRoot);
  } catch {
    throw new ServeError(500, 'internal_error', 'DELTASERVE_IMPORT_DIR does not exist on the server');
  }
  const candidate = isAbsolute(requested) ? resolve(requested) : resolve(root, requested);
  if (!inside(lexicalRoot, candidate) && !inside(root, candidate)) {
    throw forbidden('path is outside DELTASERVE_IMPORT_DIR; give a folder inside it, absolute or relative to it');
  }

  let real: string;
  try {
    real = await realpath(candidate);
  } catch {
    throw new ServeError(422, 'invalid_request', `no folder "${requested}" inside DELTASERVE_IMPORT_DIR`);
  }
  if (!inside(root, real)) throw forbidden('path resolves (through a symlink) outside DELTASERVE_IMPORT_DIR');
  if (!(await stat(real)).isDirectory()) throw new ServeError(422, 'invalid_request', `"${requested}" is not a folder`);

  const files: DeltaFile[] = [];
  for (const entry of await readdir(real, { withFileTypes: true })) {
    if (entry.isDirectory()) continue;
    const path = await realpath(join(real, entry.name)).catch(() => null);
    if (path === null) continue; // a dangling symlink holds nothing to import
    if (!inside(root, path)) throw forbidden(`"${entry.name}" is a symlink to a file outside DELTASERVE_IMPORT_DIR`);
    if ((await stat(path)).isFile()) files.push({ name: entry.name, path });
  }
  if (files.length === 0) throw new ServeError(422, 'invalid_request', `folder "${requested}" holds no files`);
  return files.sort((a, b) => a.name.localeCompare(b.name));
}
