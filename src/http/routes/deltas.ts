/**
 * Delta admin: register (upload or import by path), list, inspect, delete,
 * and vLLM's load/unload aliases. Every route here is behind admin auth.
 */
import { stat } from 'node:fs/promises';
import { Router, type Request, type RequestHandler } from 'express';
import type { BackboneInfo } from '../../backbone/types.js';
import type { DeltaFile, DeltaRecord, DeltaRegistry } from '../../deltas/types.js';
import { ServeError } from '../../errors.js';
import { resolveImport } from '../import-path.js';
import { importBody, loadLoraBody, pageQuery, parseBody, patchDeltaBody, replaceQuery, TASK_ID, TASK_ID_RULE, unloadLoraBody } from '../schemas.js';
import { isMultipart, receiveUpload, type UploadLimits } from '../upload.js';

export interface DeltaRouteDeps {
  registry: DeltaRegistry;
  backbone: BackboneInfo;
  importDir: string | null;
  upload: UploadLimits;
  auth: RequestHandler;
}

const summary = (r: DeltaRecord) => ({
  id: r.id, type: r.type, format: r.format, rank: r.rank, sites: r.sites.length, bytes: r.bytes, sha256: r.sha256,
});

const listing = (r: DeltaRecord, cached: boolean) => ({
  id: r.id, type: r.type, format: r.format, rank: r.rank, bytes: r.bytes, cached, created_at: r.createdAt, pinned: r.pinned,
});

/** Deltas per page of GET /v1/deltas when the client names no limit. */
export const DEFAULT_DELTA_PAGE = 100;

function checkId(id: unknown, backbone: BackboneInfo, field = 'id'): string {
  if (typeof id !== 'string' || !TASK_ID.test(id)) {
    throw new ServeError(400, 'bad_request', `${field}: expected ${TASK_ID_RULE}`);
  }
  if (id === backbone.name) {
    throw new ServeError(400, 'bad_request', `${field}: "${id}" is the backbone's own name, which always runs the bare backbone; choose another id`);
  }
  return id;
}

/**
 * One size limit for every way a delta comes in: an upload is cut off while it
 * arrives (upload.ts); files imported by path are measured before a byte of
 * them is read.
 */
async function checkSize(files: DeltaFile[], maxBytes: number): Promise<void> {
  let total = 0;
  for (const f of files) total += (await stat(f.path)).size;
  if (total > maxBytes) {
    throw new ServeError(413, 'payload_too_large',
      `the delta's files are ${total} bytes, over the limit of ${maxBytes} bytes (DELTASERVE_MAX_UPLOAD_BYTES), which applies to uploads and imports by path alike`);
  }
}

const notFound = (id: string) => new ServeError(404, 'delta_not_found', `no delta "${id}"; GET /v1/deltas lists them`);

export function deltaRoutes(deps: DeltaRouteDeps): Router {
  const router = Router();
  const { registry, backbone, auth } = deps;

  async function register(id: string, files: DeltaFile[], replace: boolean): Promise<DeltaRecord> {
    checkId(id, backbone);
    await checkSize(files, deps.upload.maxBytes);
    return registry.register(id, files, { replace });
  }

  /** Asks first, so a missing delta is a 404 whatever the registry's remove does with it. */
  async function remove(id: string): Promise<void> {
    if (!(await registry.get(id))) throw notFound(id);
    await registry.remove(id);
  }

  async function registerFromRequest(req: Request): Promise<DeltaRecord> {
    const q = parseBody(replaceQuery, req.query);
    const replace = q.replace === 'true' || q.replace === '1';
    if (isMultipart(req)) {
      const upload = await receiveUpload(req, deps.upload);
      try {
        if (upload.files.length === 0) throw new ServeError(400, 'bad_request', 'the upload holds no files; send each delta file as a part with its filename');
        return await register(upload.fields.id ?? '', upload.files, replace);
      } finally {
        await upload.cleanup();
      }
    }
    if (req.body === undefined) {
      throw new ServeError(400, 'bad_request', 'send the delta as multipart/form-data (field "id" + files) or JSON {"id","path"}');
    }
    const b = parseBody(importBody, req.body);
    checkId(b.id, backbone);
    return register(b.id, await resolveImport(deps.importDir, b.path), replace);
  }

  router.post('/v1/deltas', auth, async (req, res) => {
    res.status(201).json(summary(await registerFromRequest(req)));
  });

  router.get('/v1/deltas', auth, async (req, res) => {
    const q = parseBody(pageQuery, req.query);
    const page = await registry.page({ limit: q.limit ?? DEFAULT_DELTA_PAGE, after: q.after });
    const data = page.records.map((r) => listing(r, registry.isCached(r.id)));
    res.json({ object: 'list', data, first_id: data[0]?.id ?? null, last_id: data.at(-1)?.id ?? null, has_more: page.hasMore });
  });

  router.get('/v1/deltas/:id', auth, async (req, res) => {
    const id = checkId(req.params.id, backbone);
    const r = await registry.get(id);
    if (!r) throw notFound(id);
    res.json({
      ...listing(r, registry.isCached(r.id)),
      sha256: r.sha256,
      sites: r.sites.map((s) => ({ module: s.module, kind: s.kind, site: s.site, shapes: s.shapes })),
    });
  });

  router.patch('/v1/deltas/:id', auth, async (req, res) => {
    const id = checkId(req.params.id, backbone);
    const b = parseBody(patchDeltaBody, req.body);
    const r = await registry.setPinned(id, b.pinned);
    res.json(listing(r, registry.isCached(r.id)));
  });

  router.delete('/v1/deltas/:id', auth, async (req, res) => {
    await remove(checkId(req.params.id, backbone));
    res.status(204).end();
  });

  // vLLM answers these with plain-text success messages; its clients only look at the status.
  router.post('/v1/load_lora_adapter', auth, async (req, res) => {
    const b = parseBody(loadLoraBody, req.body);
    await register(b.lora_name, await resolveImport(deps.importDir, b.lora_path), b.load_inplace === true);
    res.type('text/plain').send(`Success: LoRA adapter '${b.lora_name}' added successfully.`);
  });

  router.post('/v1/unload_lora_adapter', auth, async (req, res) => {
    const b = parseBody(unloadLoraBody, req.body);
    await remove(b.lora_name);
    res.type('text/plain').send(`Success: LoRA adapter '${b.lora_name}' removed successfully.`);
  });

  return router;
}
