/**
 * Live charts from /metrics, polled every few seconds: tokens/s, running and
 * waiting requests, batch size, delta cache hit ratio and bytes, KV cache use.
 * Counters become rates over each poll interval; charts are uPlot's.
 */
import { byId, errorView, formatBytes, h } from './dom.js';

/** Five minutes of history at the default 2 s interval. */
const MAX_POINTS = 150;
const CHART_HEIGHT = 150;
/** Time axis tick spacing, in seconds: whole seconds up to ten minutes. */
const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600];

/** @param {number} t unix seconds */
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });

/**
 * Sums each sample name over its label sets (`deltaserve_generated_tokens_total{task="a"} 3`
 * and `{task="b"} 4` give 7). Comments, `NaN` and `±Inf` samples are skipped.
 * @param {string} text the Prometheus text format
 * @returns {Map<string, number>}
 */
function sumSamples(text) {
  /** @type {Map<string, number>} */
  const sums = new Map();
  for (const line of text.split('\n')) {
    // name, optional {labels} (label values may hold "}" — the last "} " closes them), value, optional timestamp
    const m = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{.*\})?\s+(\S+)(?:\s+-?\d+)?\s*$/.exec(line);
    if (!m) continue;
    const value = Number(m[2]);
    if (Number.isFinite(value)) sums.set(m[1], (sums.get(m[1]) ?? 0) + value);
  }
  return sums;
}

/**
 * @typedef {object} Scrape
 * @property {number} t unix seconds
 * @property {Map<string, number>} s sample sums
 */

/**
 * A counter's increase between two scrapes, or null when it went down (the server restarted).
 * @param {Scrape} prev @param {Scrape} cur @param {string} name
 */
function increase(prev, cur, name) {
  const d = (cur.s.get(name) ?? 0) - (prev.s.get(name) ?? 0);
  return d >= 0 ? d : null;
}

/** @param {number | null} a @param {number | null} b */
const ratio = (a, b) => (a === null || b === null || b === 0 ? null : a / b);

/**
 * @typedef {object} ChartSpec
 * @property {string} id
 * @property {string} title
 * @property {{label: string, color: string, value: (prev: Scrape, cur: Scrape) => number | null}[]} series
 * @property {(v: number) => string} format for the caption
 * @property {(v: number) => string} [tick] for the axis, when shorter than `format`
 * @property {boolean} [counts] whole numbers: integer axis ticks
 */

/** @type {ChartSpec[]} */
const CHARTS = [
  {
    id: 'tokens', title: 'Generated tokens/s', format: (v) => v.toFixed(1),
    series: [{ label: 'tokens/s', color: '#1f5fbf', value: (p, c) => ratio(increase(p, c, 'deltaserve_generated_tokens_total'), c.t - p.t) }],
  },
  {
    id: 'requests', title: 'Requests', format: (v) => String(Math.round(v)), counts: true,
    series: [
      { label: 'running', color: '#1f7a3d', value: (_p, c) => c.s.get('deltaserve_num_requests_running') ?? null },
      { label: 'waiting', color: '#b85c00', value: (_p, c) => c.s.get('deltaserve_num_requests_waiting') ?? null },
    ],
  },
  {
    id: 'batch', title: 'Batch size (rows per engine step)', format: (v) => v.toFixed(1),
    series: [{ label: 'mean rows', color: '#6b3fa0', value: (p, c) => ratio(increase(p, c, 'deltaserve_batch_size_sum'), increase(p, c, 'deltaserve_batch_size_count')) }],
  },
  {
    id: 'hit-ratio', title: 'Delta cache hit ratio', format: (v) => `${(v * 100).toFixed(0)} %`,
    series: [{
      label: 'hits / lookups', color: '#1f7a3d',
      value: (p, c) => {
        const hits = increase(p, c, 'deltaserve_delta_cache_hits_total');
        const misses = increase(p, c, 'deltaserve_delta_cache_misses_total');
        return ratio(hits, hits === null || misses === null ? null : hits + misses);
      },
    }],
  },
  {
    id: 'cache-bytes', title: 'Delta cache bytes', format: formatBytes,
    series: [{ label: 'bytes', color: '#1f5fbf', value: (_p, c) => c.s.get('deltaserve_delta_cache_bytes') ?? null }],
  },
  {
    id: 'kv', title: 'KV cache in use', format: (v) => `${(v * 100).toFixed(1)} %`, tick: (v) => `${(v * 100).toFixed(0)} %`,
    series: [{ label: 'in use', color: '#b3261e', value: (_p, c) => c.s.get('deltaserve_kv_cache_usage_perc') ?? null }],
  },
];

class Chart {
  /** @param {ChartSpec} spec */
  constructor(spec) {
    this.spec = spec;
    /** @type {(number | null)[][]} x (unix seconds) then one array per series */
    this.data = [[], ...spec.series.map(() => [])];
    this.now = h('span', { class: 'now' }, '—');
    this.canvasBox = h('div', { class: 'plot', role: 'img', 'aria-label': `${spec.title} over the last minutes` });
    this.root = h('figure', { class: 'chart', dataset: { chart: spec.id } },
      h('figcaption', null, h('span', null, spec.title), this.now),
      this.canvasBox);
    /** @type {uPlot | null} */
    this.plot = null;
  }

  /** @param {Scrape} prev @param {Scrape} cur */
  push(prev, cur) {
    const values = this.spec.series.map((s) => s.value(prev, cur));
    this.data[0].push(cur.t);
    values.forEach((v, i) => this.data[i + 1].push(v));
    if (this.data[0].length > MAX_POINTS) for (const column of this.data) column.shift();
    const shown = (/** @type {number | null} */ v) => (v === null ? '—' : this.spec.format(v));
    this.now.replaceChildren(...values.map((v, i) => {
      const max = Math.max(...this.data[i + 1].filter((x) => x !== null).map(Number));
      const swatch = h('span', { class: 'swatch', 'aria-hidden': 'true' });
      // CSSOM, not a style attribute: the page's CSP allows no inline styles.
      swatch.style.background = this.spec.series[i].color;
      return h('span', { class: 'series' }, swatch, `${this.spec.series[i].label} ${shown(v)} (max ${shown(Number.isFinite(max) ? max : null)})`);
    }));
    this.root.dataset.points = String(this.data[0].length);
    this.plot?.setData(/** @type {uPlot.AlignedData} */ (this.data));
  }

  /** Draws (or resizes) once the panel is visible, since uPlot sizes to its box. */
  fit() {
    const width = Math.max(200, this.canvasBox.clientWidth);
    if (this.plot) {
      this.plot.setSize({ width, height: CHART_HEIGHT });
      return;
    }
    const tick = this.spec.tick ?? this.spec.format;
    this.plot = new uPlot({
      width, height: CHART_HEIGHT,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { y: { range: (_u, min, max) => [Math.min(0, min ?? 0), Math.max(max ?? 1, min === max ? 1 : max ?? 1)] } },
      axes: [{ space: 70, incrs: TIME_STEPS, values: (_u, ticks) => ticks.map(clock) }, { size: 60, values: (_u, ticks) => ticks.map(tick), ...(this.spec.counts ? { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] } : {}) }],
      series: [{}, ...this.spec.series.map((s) => ({ label: s.label, stroke: s.color, width: 2, spanGaps: false }))],
    }, /** @type {uPlot.AlignedData} */ (this.data), this.canvasBox);
  }
}

export class LivePanel {
  constructor() {
    this.charts = CHARTS.map((spec) => new Chart(spec));
    this.interval = byId('live-interval', HTMLSelectElement);
    this.state = byId('live-state', HTMLElement);
    this.error = byId('live-error', HTMLElement);
    this.panel = byId('panel-live', HTMLElement);
    /** @type {Scrape | null} */
    this.last = null;
    /** @type {number | undefined} */
    this.timer = undefined;
    byId('charts', HTMLElement).append(...this.charts.map((c) => c.root));
    this.interval.addEventListener('change', () => this.start());
    new ResizeObserver(() => this.shown()).observe(this.panel);
  }

  start() {
    clearInterval(this.timer);
    void this.poll();
    this.timer = setInterval(() => void this.poll(), Number(this.interval.value));
  }

  shown() {
    if (!this.panel.hidden) for (const chart of this.charts) chart.fit();
  }

  async poll() {
    try {
      const res = await fetch('/metrics');
      if (!res.ok) throw new Error(`/metrics answered ${res.status}`);
      /** @type {Scrape} */
      const cur = { t: Date.now() / 1000, s: sumSamples(await res.text()) };
      if (this.last) for (const chart of this.charts) chart.push(this.last, cur);
      this.last = cur;
      this.error.replaceChildren();
      this.state.textContent = `${cur.s.get('deltaserve_deltas_registered') ?? 0} deltas registered · updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      this.error.replaceChildren(errorView(err));
    }
  }
}
