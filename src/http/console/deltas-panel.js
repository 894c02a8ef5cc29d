/**
 * Delta management over the admin API: the list (GET /v1/deltas), register
 * by dropping a folder or its files (multipart POST /v1/deltas) or by an
 * import path (JSON), replace (?replace=true) and delete. A refusal is shown
 * with every problem the server listed.
 */
import { request } from './api.js';
import { byId, errorView, formatBytes, h } from './dom.js';

/**
 * A dropped folder's files (its top level: delta folders are flat) and its name.
 * @param {DataTransfer} transfer
 * @returns {Promise<{files: File[], folder: string | null}>}
 */
async function droppedFiles(transfer) {
  const entries = [...transfer.items].map((item) => item.webkitGetAsEntry?.()).filter((e) => e !== null && e !== undefined);
  const folder = entries.length === 1 && entries[0].isDirectory ? /** @type {FileSystemDirectoryEntry} */ (entries[0]) : null;
  if (!folder) return { files: [...transfer.files], folder: null };
  const reader = folder.createReader();
  /** @type {FileSystemEntry[]} */
  const children = [];
  // readEntries answers in batches until it answers an empty one.
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) break;
    children.push(...batch);
  }
  const files = await Promise.all(children.filter((e) => e.isFile).map((e) =>
    new Promise((resolve, reject) => /** @type {FileSystemFileEntry} */ (e).file(resolve, reject))));
  return { files: /** @type {File[]} */ (files), folder: folder.name };
}

export class DeltasPanel {
  /**
   * @param {import('./catalog.js').Catalog} catalog
   * @param {{showSites: (id: string) => void}} nav
   */
  constructor(catalog, nav) {
    this.catalog = catalog;
    this.nav = nav;
    this.body = /** @type {HTMLTableSectionElement} */ (byId('deltas-table', HTMLTableElement).tBodies[0]);
    this.state = byId('deltas-state', HTMLElement);
    this.error = byId('deltas-error', HTMLElement);
    this.form = byId('register-form', HTMLFormElement);
    this.idInput = byId('register-id', HTMLInputElement);
    this.pathInput = byId('register-path', HTMLInputElement);
    this.replaceBox = byId('register-replace', HTMLInputElement);
    this.chosen = byId('chosen-files', HTMLUListElement);
    this.result = byId('register-result', HTMLElement);
    /** @type {File[]} */
    this.files = [];

    catalog.addEventListener('change', () => this.render());
    byId('deltas-refresh', HTMLButtonElement).addEventListener('click', () => void this.catalog.refresh());
    this.setUpDrop();
    this.form.addEventListener('submit', (event) => {
      event.preventDefault();
      void this.register();
    });
    this.form.addEventListener('reset', () => {
      this.choose([], null);
      this.result.replaceChildren();
    });
  }

  render() {
    const deltas = this.catalog.deltas;
    const err = this.catalog.deltasError;
    this.error.replaceChildren(...(err ? [errorView(err)] : []));
    if (err?.isAuth) this.error.append(h('p', null, 'Enter the admin token at the top of the page; it is kept for this tab only.'));
    this.state.textContent = deltas ? `${deltas.length} registered` : '';
    this.body.replaceChildren(...(deltas ?? []).map((d) => h('tr', { dataset: { id: d.id } },
      h('th', { scope: 'row', 'data-label': 'id' }, d.id),
      h('td', { 'data-label': 'type' }, d.type),
      h('td', { 'data-label': 'format' }, d.format),
      h('td', { 'data-label': 'rank' }, d.rank),
      h('td', { 'data-label': 'size' }, formatBytes(d.bytes)),
      h('td', { 'data-label': 'cached' }, d.cached ? 'yes' : 'no', d.pinned ? ' · pinned' : ''),
      h('td', { 'data-label': 'registered' }, h('time', { datetime: d.created_at }, new Date(d.created_at).toLocaleString())),
      h('td', { class: 'actions' },
        h('button', { type: 'button', 'aria-label': `Show the sites of ${d.id}`, onclick: () => this.nav.showSites(d.id) }, 'Sites'),
        h('button', { type: 'button', 'aria-label': `Replace ${d.id}`, onclick: () => this.startReplace(d.id) }, 'Replace'),
        h('button', { type: 'button', class: 'danger', 'aria-label': `Delete ${d.id}`, onclick: () => void this.remove(d.id) }, 'Delete')),
    )));
  }

  setUpDrop() {
    const zone = byId('drop-zone', HTMLElement);
    zone.addEventListener('dragover', (event) => {
      event.preventDefault();
      zone.classList.add('over');
    });
    zone.addEventListener('dragleave', () => zone.classList.remove('over'));
    zone.addEventListener('drop', (event) => {
      event.preventDefault();
      zone.classList.remove('over');
      if (!event.dataTransfer) return;
      droppedFiles(event.dataTransfer).then(({ files, folder }) => this.choose(files, folder), (err) => {
        this.result.replaceChildren(errorView(err));
      });
    });
    const pickFiles = byId('pick-files', HTMLInputElement);
    pickFiles.addEventListener('change', () => this.choose([...(pickFiles.files ?? [])], null));
    const pickFolder = byId('pick-folder', HTMLInputElement);
    pickFolder.addEventListener('change', () => {
      const all = [...(pickFolder.files ?? [])];
      // webkitRelativePath is "folder/file"; deeper files (a checkpoint's subfolders) are not the delta's.
      const top = all.filter((f) => f.webkitRelativePath.split('/').length === 2);
      this.choose(top, all[0]?.webkitRelativePath.split('/')[0] ?? null);
    });
  }

  /** @param {File[]} files @param {string | null} folder */
  choose(files, folder) {
    this.files = files;
    if (folder && !this.idInput.value) this.idInput.value = folder;
    this.chosen.replaceChildren(...files.map((f) => h('li', null, h('code', null, f.name), ` ${formatBytes(f.size)}`)));
  }

  /** @param {string} id */
  startReplace(id) {
    this.idInput.value = id;
    this.replaceBox.checked = true;
    this.result.replaceChildren(h('p', null, `Choose the new files for ${id}, then Register.`));
    this.idInput.scrollIntoView({ block: 'center' });
    byId('pick-files', HTMLInputElement).focus();
  }

  async register() {
    if (!this.form.reportValidity()) return;
    const id = this.idInput.value.trim();
    const path = this.pathInput.value.trim();
    if ((this.files.length > 0) === (path !== '')) {
      this.result.replaceChildren(errorView(new Error('Choose the delta\'s files, or give an import path — one of the two.')));
      return;
    }
    const query = this.replaceBox.checked ? '?replace=true' : '';
    let opts;
    if (path) {
      opts = { json: { id, path } };
    } else {
      const form = new FormData();
      form.append('id', id);
      for (const file of this.files) form.append('file', file, file.name);
      opts = { form };
    }
    this.result.replaceChildren(h('p', { class: 'muted' }, `registering ${id}…`));
    try {
      const res = await request(`/v1/deltas${query}`, { ...opts, admin: true });
      const d = await res.json();
      this.result.replaceChildren(h('p', { class: 'ok', role: 'status' },
        `Registered ${d.id}: ${d.type} (${d.format}), rank ${d.rank}, ${d.sites} sites, ${formatBytes(d.bytes)}. `,
        h('button', { type: 'button', onclick: () => this.nav.showSites(d.id) }, 'Show its sites')));
      this.files = [];
      this.chosen.replaceChildren();
      this.replaceBox.checked = false;
      this.pathInput.value = '';
      await this.catalog.refresh();
    } catch (err) {
      this.result.replaceChildren(errorView(err));
    }
  }

  /** @param {string} id */
  async remove(id) {
    if (!confirm(`Delete the delta ${id}? Requests already running on it finish; new ones get 404.`)) return;
    try {
      await request(`/v1/deltas/${encodeURIComponent(id)}`, { method: 'DELETE', admin: true });
    } catch (err) {
      this.error.replaceChildren(errorView(err));
      return;
    }
    await this.catalog.refresh();
  }
}
