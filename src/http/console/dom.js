/**
 * Small DOM helpers. Every piece of text from the server or the user goes in
 * as a text node, never as markup.
 */

/**
 * The element with this id; a missing one is a bug in index.html, so it throws.
 * @template {HTMLElement} T
 * @param {string} id
 * @param {new () => T} type
 * @returns {T}
 */
export function byId(id, type) {
  const node = document.getElementById(id);
  if (!(node instanceof type)) throw new Error(`#${id} is not a ${type.name}`);
  return node;
}

/**
 * `h('li', {class: 'site', dataset: {module}}, 'text', child)`.
 * @template {keyof HTMLElementTagNameMap} K
 * @param {K} tag
 * @param {Record<string, any> | null} [props] attributes; `dataset` and `on<event>` handled specially
 * @param {...(Node | string | number | null | undefined | false)} children
 * @returns {HTMLElementTagNameMap[K]}
 */
export function h(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'dataset') {
      for (const [name, data] of Object.entries(value)) if (data !== undefined && data !== null) node.dataset[name] = String(data);
    }
    else if (key.startsWith('on') && typeof value === 'function') node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === 'number' ? String(child) : child);
  }
  return node;
}

/**
 * An error for the page: its message, and every problem the server listed.
 * @param {unknown} err
 * @returns {HTMLElement}
 */
export function errorView(err) {
  const e = /** @type {{message?: string, code?: string, details?: string[]}} */ (err ?? {});
  const message = e.message ?? String(err);
  const details = e.details ?? [];
  return h('div', { class: 'error', role: 'alert' },
    h('p', null, e.code ? h('code', null, e.code) : null, e.code ? ' ' : null, message),
    details.length ? h('ul', { class: 'problems' }, ...details.map((d) => h('li', null, d))) : null,
  );
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

/** @param {number} bytes */
export function formatBytes(bytes) {
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${unit === 0 ? value : value.toFixed(value < 10 ? 1 : 0)} ${UNITS[unit]}`;
}
