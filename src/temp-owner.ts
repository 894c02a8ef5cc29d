/**
 * Temporary folders named by the process that writes them (`<prefix><pid>@<host>-…`),
 * so that a process starting up can tell a folder left by a writer that died
 * (SIGKILL, OOM: no cleanup ran) from one a live writer is still filling.
 * Folders from another host (a store shared by replicas) or in an older
 * naming are judged by age instead.
 */
import { hostname } from 'node:os';
import { readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';

const HOST = hostname().replace(/[^A-Za-z0-9_.]/g, '_') || 'host';

/** The owner part of a temp folder's name: `<pid>@<host>-`. */
export const ownerTag = () => `${process.pid}@${HOST}-`;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it exists but belongs to someone else.
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Whether the folder `name` (after its prefix) was left behind: its writer on this host is gone, or it is older than `staleMs`. */
export async function isLeftBehind(path: string, afterPrefix: string, staleMs: number): Promise<boolean> {
  const m = /^(\d+)@([^-]*)-/.exec(afterPrefix);
  if (m && m[2] === HOST) return Number(m[1]) !== process.pid && !alive(Number(m[1]));
  // staleMs 0 means the caller knows it is alone (file times can be a tick ahead of Date.now()).
  try {
    return staleMs <= 0 || Date.now() - (await stat(path)).mtimeMs >= staleMs;
  } catch {
    return false;
  }
}

/** Removes the folders under `dir` whose names start with `prefix` and that were left behind; returns how many. */
export async function sweepLeftBehind(dir: string, prefix: string, staleMs: number): Promise<number> {
  let entries: string[];
  try {
    entries = await readdir(dir);
  } catch {
    return 0;
  }
  let removed = 0;
  for (const entry of entries) {
    if (!entry.startsWith(prefix)) continue;
    const path = join(dir, entry);
    if (await isLeftBehind(path, entry.slice(prefix.length), staleMs)) {
      await rm(path, { recursive: true, force: true });
      removed++;
    }
  }
  return removed;
}
