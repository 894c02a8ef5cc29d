/**
 * The console's entry: the header (backbone, admin token), the four tabs
 * (the URL's #hash names the open one), and the panels, which share one Catalog.
 */
import { adminToken, getJson } from './api.js';
import { BackbonePanel } from './backbone-panel.js';
import { Catalog } from './catalog.js';
import { DeltasPanel } from './deltas-panel.js';
import { byId, errorView } from './dom.js';
import { LivePanel } from './live-panel.js';
import { Playground } from './playground.js';

const PANELS = ['playground', 'backbone', 'deltas', 'live'];

/** @param {(panel: string) => void} onShow */
function setUpTabs(onShow) {
  const tabs = /** @type {HTMLButtonElement[]} */ ([...document.querySelectorAll('[role="tab"]')]);
  /** @param {string} name @param {boolean} focus */
  const show = (name, focus) => {
    for (const tab of tabs) {
      const selected = tab.dataset.panel === name;
      tab.setAttribute('aria-selected', String(selected));
      tab.tabIndex = selected ? 0 : -1;
      byId(`panel-${tab.dataset.panel}`, HTMLElement).hidden = !selected;
      if (selected && focus) tab.focus();
    }
    onShow(name);
  };
  const fromHash = () => {
    const name = location.hash.slice(1);
    return PANELS.includes(name) ? name : 'playground';
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener('click', () => {
      history.replaceState(null, '', `#${tab.dataset.panel}`);
      show(tab.dataset.panel ?? 'playground', false);
    });
    // WAI-ARIA tabs: arrows move between tabs, Home/End jump; Tab leaves the tab list.
    tab.addEventListener('keydown', (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1, Home: -i, End: tabs.length - 1 - i }[event.key];
      if (step === undefined) return;
      event.preventDefault();
      const next = tabs[(i + step + tabs.length) % tabs.length];
      next.click();
      next.focus();
    });
  });
  window.addEventListener('hashchange', () => show(fromHash(), false));
  show(fromHash(), false);
  return { show: (/** @type {string} */ name) => {
    history.replaceState(null, '', `#${name}`);
    show(name, true);
  } };
}

/** @param {Catalog} catalog */
function setUpToken(catalog) {
  const form = byId('token-form', HTMLFormElement);
  const input = byId('admin-token', HTMLInputElement);
  const state = byId('token-state', HTMLElement);
  const describe = () => {
    state.textContent = adminToken.get() ? 'token kept for this tab' : '';
  };
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const token = input.value.trim();
    if (token) adminToken.set(token);
    input.value = '';
    describe();
    void catalog.refresh();
  });
  byId('token-forget', HTMLButtonElement).addEventListener('click', () => {
    adminToken.clear();
    describe();
    void catalog.refresh();
  });
  describe();
}

async function main() {
  const summary = byId('backbone-summary', HTMLElement);
  let backbone;
  try {
    backbone = await getJson('/v1/backbone');
  } catch (err) {
    summary.replaceChildren(errorView(err));
    return;
  }
  summary.textContent = `${backbone.name} · ${backbone.family} · ${backbone.modules.length} linear modules`;
  const catalog = new Catalog(backbone);
  setUpToken(catalog);

  const live = new LivePanel();
  const backbonePanel = new BackbonePanel(catalog);
  const tabs = setUpTabs((name) => {
    if (name === 'live') live.shown();
  });
  new Playground(catalog);
  new DeltasPanel(catalog, {
    showSites: (id) => {
      backbonePanel.select(id);
      tabs.show('backbone');
    },
  });
  live.start();
  await catalog.refresh();
  document.body.dataset.ready = 'true';
}

void main();
