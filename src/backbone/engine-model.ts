/**
 * Where ORT loads the engine graph from. A self-contained model goes to ORT
 * as bytes. A model whose weights sit in external data files (every model
 * over protobuf's 2 GB) cannot be inlined, and ORT resolves external data
 * only inside the folder of the model file it loads (symlinks out are
 * refused). So the rewritten graph is written into a cache folder beside hard
 * links to those files; where the cache is on another filesystem, beside the
 * model itself under a dot-name; and where neither is possible, the error
 * says how to make one work.
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { link, mkdir, mkdtemp, rename, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { Backbone } from './backbone.js';
import { defaultCacheDir } from './demo/materialize.js';

/** Writes `bytes` as `model.onnx` in a fresh folder inside `parent` whose external data files are hard links. */
async function linkedFolder(parent: string, name: string, dir: string, files: string[], bytes: Uint8Array): Promise<string> {
  const target = join(parent, name);
  const modelPath = join(target, 'model.onnx');
  if (existsSync(modelPath)) return modelPath;
  await mkdir(parent, { recursive: true });
  const tmp = await mkdtemp(join(parent, '.tmp-engine-'));
  try {
    for (const file of files) {
      await mkdir(dirname(join(tmp, file)), { recursive: true });
      await link(join(dir, file), join(tmp, file));
    }
    await writeFile(join(tmp, 'model.onnx'), bytes);
    await rename(tmp, target).catch((e) => {
      if (!existsSync(modelPath)) throw e;
    });
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
  return modelPath;
}

export async function engineModelSource(backbone: Backbone, bytes: Uint8Array, cacheDir = defaultCacheDir()): Promise<Uint8Array | string> {
  const { externalFiles, modelDir: dir } = backbone.source;
  if (externalFiles.length === 0) return bytes;
  const hash = createHash('sha256').update(bytes).update(dir).digest('hex').slice(0, 16);
  try {
    return await linkedFolder(cacheDir, `engine-${hash}`, dir, externalFiles, bytes);
  } catch (first) {
    const beside = join(dir, `.deltaserve-engine-${hash}.onnx`);
    try {
      if (!existsSync(beside)) await writeFile(beside, bytes);
      return beside;
    } catch {
      throw new Error(
        `cannot place the rewritten graph where ORT will find ${externalFiles.join(', ')}: hard links from ` +
        `${cacheDir} failed (${(first as Error).message}) and ${dir} is not writable. Put DELTASERVE_CACHE_DIR on the ` +
        'same filesystem as the model, or make the model folder writable',
      );
    }
  }
}
