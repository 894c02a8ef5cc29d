/**
 * What the panels share: the backbone, the tasks a column can run (public,
 * from /v1/models) and the registered deltas (admin, from /v1/deltas). One
 * refresh after a registration or deletion updates every panel through
 * the "change" event.
 */
import { ApiError, getJson, listAll } from './api.js';

/**
 * @typedef {object} Backbone
 * @property {string} name
 * @property {string} family
 * @property {string} fingerprint
 * @property {{name: string, kind: string, in_features: number, out_features: number}[]} modules
 * @property {Record<string, string[]>} default_targets
 * @property {boolean} [chat_template]
 */

/**
 * @typedef {object} DeltaEntry
 * @property {string} id
 * @property {string} type
 * @property {string} format
 * @property {number} rank
 * @property {number} bytes
 * @property {boolean} cached
 * @property {string} created_at
 * @property {boolean} [pinned]
 */

/**
 * @typedef {object} DeltaDetail
 * @property {string} id
 * @property {string} type
 * @property {number} rank
 * @property {{module: string, kind: string, shapes: number[][]}[]} sites
 */

export class Catalog extends EventTarget {
  /** @param {Backbone} backbone */
  constructor(backbone) {
    super();
    this.backbone = backbone;
    /** @type {string[]} task ids, the backbone's own name first */
    this.tasks = [backbone.name];
    /** @type {DeltaEntry[] | null} null until listed, or when the admin API refused */
    this.deltas = null;
    /** @type {ApiError | null} why the delta list is not there */
    this.deltasError = null;
  }

  async refresh() {
    const [models, deltas] = await Promise.allSettled([listAll('/v1/models'), listAll('/v1/deltas', { admin: true })]);
    if (models.status === 'fulfilled') {
      const ids = models.value.map((m) => String(m.id)).filter((id) => id !== this.backbone.name);
      this.tasks = [this.backbone.name, ...ids];
    }
    if (deltas.status === 'fulfilled') {
      this.deltas = deltas.value;
      this.deltasError = null;
    } else {
      this.deltas = null;
      this.deltasError = deltas.reason instanceof ApiError ? deltas.reason : new ApiError(0, 'network_error', String(deltas.reason));
    }
    this.dispatchEvent(new Event('change'));
  }

  /**
   * @param {string} id
   * @returns {Promise<DeltaDetail>}
   */
  detail(id) {
    return getJson(`/v1/deltas/${encodeURIComponent(id)}`, { admin: true });
  }
}
