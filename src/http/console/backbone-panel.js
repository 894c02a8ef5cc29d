/**
 * The backbone as a collapsible module tree, drawn like OpenDelta's
 * `delta.log()`: the module paths of /v1/backbone split on ".", runs of
 * identical numbered layers folded into one entry ("0-3"), and a chosen
 * delta's sites (GET /v1/deltas/{id}) marked on exactly the modules they
 * touch, with their kind, rank and shapes.
 */
import { byId, errorView, h } from './dom.js';

/** @typedef {import('./catalog.js').Backbone['modules'][number]} Module */
/** @typedef {import('./catalog.js').DeltaDetail['sites'][number]} Site */
/**
 * @typedef {object} TreeNode
 * @property {string} name the path segment
 * @property {string} path the full module path
 * @property {Map<string, TreeNode>} children
 * @property {Module | null} module set on the linear modules themselves
 */

/** @param {Module[]} modules @returns {TreeNode} */
function buildTree(modules) {
  /** @type {TreeNode} */
  const root = { name: '', path: '', children: new Map(), module: null };
  for (const module of modules) {
    let node = root;
    for (const segment of module.name.split('.')) {
      let child = node.children.get(segment);
      if (!child) {
        child = { name: segment, path: node.path ? `${node.path}.${segment}` : segment, children: new Map(), module: null };
        node.children.set(segment, child);
      }
      node = child;
    }
    node.module = module;
  }
  return root;
}

/** What a site changes, in a few words: `lora r=8 · [128×8] [8×128]`. @param {Site} site */
function describeSite(site) {
  const shapes = site.shapes.map((s) => `[${s.join('×')}]`).join(' ');
  const rank = site.kind === 'lora' ? ` r=${site.shapes[0]?.[1]}` : site.kind === 'adapter' ? ` bottleneck ${site.shapes[0]?.[1]}` : '';
  return `${site.kind}${rank} · ${shapes}`;
}

/**
 * Renders the tree. `group` holds parallel nodes of identical structure and
 * marks (folded layers): one entry stands for all of them.
 */
class TreeView {
  /** @param {Map<string, Site[]>} sites by module @param {boolean} fold */
  constructor(sites, fold) {
    this.sites = sites;
    this.fold = fold;
    /** @type {Map<TreeNode, string>} */
    this.signatures = new Map();
  }

  /** Structure and marks of a subtree, to tell which layers may fold together. @param {TreeNode} node @returns {string} */
  signature(node) {
    let sig = this.signatures.get(node);
    if (sig === undefined) {
      const own = node.module ? `${node.module.in_features}x${node.module.out_features}:${(this.sites.get(node.path) ?? []).map(describeSite).join('+')}` : '';
      sig = `${own}{${[...node.children.values()].map((c) => `${c.name}=${this.signature(c)}`).join(',')}}`;
      this.signatures.set(node, sig);
    }
    return sig;
  }

  /** Sites on the modules a group's subtree stands for. @param {TreeNode[]} group @returns {number} */
  siteCount(group) {
    let n = 0;
    for (const node of group) {
      n += this.sites.get(node.path)?.length ?? 0;
      for (const child of node.children.values()) n += this.siteCount([child]);
    }
    return n;
  }

  /**
   * The entries under a group: one per child name, or, for numbered layers
   * when folding, one per run of identical consecutive layers.
   * @param {TreeNode[]} group
   * @returns {{label: string, group: TreeNode[]}[]}
   */
  entries(group) {
    const names = [...group[0].children.keys()];
    const parallel = (/** @type {string} */ name) => group.map((n) => /** @type {TreeNode} */ (n.children.get(name)));
    if (!this.fold || !names.every((name) => /^\d+$/.test(name))) return names.map((name) => ({ label: name, group: parallel(name) }));
    /** @type {{label: string, group: TreeNode[], first: string, last: string, sig: string}[]} */
    const runs = [];
    for (const name of names) {
      const members = parallel(name);
      const sig = this.signature(members[0]);
      const run = runs[runs.length - 1];
      if (run && run.sig === sig && Number(name) === Number(run.last) + 1) {
        run.group = run.group.concat(members);
        run.last = name;
      } else {
        runs.push({ label: name, group: members, first: name, last: name, sig });
      }
    }
    return runs.map((r) => ({ label: r.first === r.last ? r.first : `${r.first}-${r.last}`, group: r.group }));
  }

  /** @param {string} label @param {TreeNode[]} group @param {number} depth @returns {HTMLLIElement} */
  item(label, group, depth) {
    const node = group[0];
    if (node.module) return this.leaf(label, group);
    const count = this.siteCount(group);
    const details = h('details', { open: count > 0 || (this.sites.size === 0 && depth < 2) },
      h('summary', null, h('span', { class: 'name' }, label),
        /^\d+-\d+$/.test(label) ? h('span', { class: 'muted' }, ` ×${group.length}`) : null,
        count ? h('span', { class: 'count' }, ` ${count} site${count > 1 ? 's' : ''}`) : null),
      h('ul', null, ...this.entries(group).map((e) => this.item(e.label, e.group, depth + 1))),
    );
    return h('li', { class: 'branch' }, details);
  }

  /** @param {string} label @param {TreeNode[]} group @returns {HTMLLIElement} */
  leaf(label, group) {
    const module = /** @type {Module} */ (group[0].module);
    const sites = this.sites.get(group[0].path) ?? [];
    const paths = group.map((n) => n.path);
    return h('li', {
      class: sites.length ? 'leaf site' : 'leaf',
      dataset: { modules: paths.join(' '), kind: sites.map((s) => s.kind).join(' ') || undefined },
      title: paths.join('\n'),
    },
      h('span', { class: 'name' }, label),
      h('span', { class: 'muted' }, ` Linear(${module.in_features} → ${module.out_features})`),
      ...sites.map((s) => h('span', { class: `badge kind-${s.kind}` }, describeSite(s))),
    );
  }

  /** @param {TreeNode} root */
  render(root) {
    return h('ul', { class: 'tree-root' }, ...this.entries([root]).map((e) => this.item(e.label, e.group, 0)));
  }
}

export class BackbonePanel {
  /** @param {import('./catalog.js').Catalog} catalog */
  constructor(catalog) {
    this.catalog = catalog;
    this.tree = buildTree(catalog.backbone.modules);
    this.picker = byId('site-delta', HTMLSelectElement);
    this.foldBox = byId('fold-layers', HTMLInputElement);
    this.container = byId('module-tree', HTMLElement);
    this.summary = byId('site-summary', HTMLElement);
    this.extra = byId('site-extra', HTMLElement);
    /** @type {Map<string, Site[]>} */
    this.sites = new Map();
    /** Ignores the answer to a selection the user already moved away from. */
    this.generation = 0;

    this.picker.addEventListener('change', () => void this.select(this.picker.value));
    this.foldBox.addEventListener('change', () => this.draw());
    byId('tree-expand', HTMLButtonElement).addEventListener('click', () => this.setAllOpen(true));
    byId('tree-collapse', HTMLButtonElement).addEventListener('click', () => this.setAllOpen(false));
    catalog.addEventListener('change', () => this.deltasChanged());
    this.draw();
  }

  deltasChanged() {
    const current = this.picker.value;
    const deltas = this.catalog.deltas;
    const options = [h('option', { value: '' }, deltas ? 'no delta' : 'no delta (the delta list needs the admin token)')];
    for (const d of deltas ?? []) options.push(h('option', { value: d.id }, `${d.id} (${d.type}, rank ${d.rank})`));
    this.picker.replaceChildren(...options);
    this.picker.value = current;
    // A selected delta that was deleted or replaced: show what the store says now.
    if (current && !deltas?.some((d) => d.id === current)) void this.select('');
  }

  /** Highlights the sites of delta `id` ('' for none). @param {string} id */
  async select(id) {
    const generation = ++this.generation;
    if (id && ![...this.picker.options].some((o) => o.value === id)) this.picker.append(h('option', { value: id }, id));
    this.picker.value = id;
    if (!id) {
      this.sites = new Map();
      this.summary.replaceChildren();
      this.draw();
      return;
    }
    this.summary.textContent = `loading the sites of ${id}…`;
    try {
      const detail = await this.catalog.detail(id);
      if (generation !== this.generation) return;
      /** @type {Map<string, Site[]>} */
      const sites = new Map();
      for (const site of detail.sites) sites.set(site.module, [...(sites.get(site.module) ?? []), site]);
      this.sites = sites;
      const modules = new Set(this.catalog.backbone.modules.map((m) => m.name));
      const kinds = [...new Set(detail.sites.map((s) => s.kind))];
      this.summary.replaceChildren(h('p', null,
        h('strong', null, detail.id), ` · ${detail.type} · rank ${detail.rank} · ${detail.sites.length} site${detail.sites.length === 1 ? '' : 's'} on `,
        `${[...sites.keys()].filter((m) => modules.has(m)).length} of ${modules.size} modules `,
        ...kinds.map((k) => h('span', { class: `badge kind-${k}` }, k))));
      this.draw();
    } catch (err) {
      if (generation !== this.generation) return;
      this.sites = new Map();
      this.summary.replaceChildren(errorView(err));
      this.draw();
    }
  }

  draw() {
    this.container.replaceChildren(new TreeView(this.sites, this.foldBox.checked).render(this.tree));
    // Sites a future delta kind puts outside the linear modules (embeddings, whole layers) still get shown.
    const modules = new Set(this.catalog.backbone.modules.map((m) => m.name));
    const outside = [...this.sites.entries()].filter(([module]) => !modules.has(module));
    this.extra.replaceChildren(...(outside.length ? [
      h('h3', null, 'Sites outside the linear modules'),
      h('ul', null, ...outside.flatMap(([module, sites]) => sites.map((s) => h('li', null, h('code', null, module), ` ${describeSite(s)}`)))),
    ] : []));
  }

  /** @param {boolean} open */
  setAllOpen(open) {
    for (const details of this.container.querySelectorAll('details')) details.open = open;
  }
}
