/**
 * Line charts as hand-written SVG (no dependency, readable in a browser and
 * on GitHub): one x axis, one y axis, several named series of points.
 */

export interface Series {
  name: string;
  points: [number, number][];
}

export interface Chart {
  title: string;
  xLabel: string;
  yLabel: string;
  series: Series[];
  /** Log-2 x axis (distinct deltas 1, 8, 32, 128). */
  logX?: boolean;
  /** Category labels instead of numbers on x (points' x are their indexes). */
  xCategories?: string[];
}

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b'];
const W = 640;
const H = 400;
const M = { left: 70, right: 170, top: 40, bottom: 55 };

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

/** Round step for about `n` ticks over [0, max]. */
function niceStep(max: number, n = 5): number {
  const raw = max / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => s >= raw) ?? raw;
}

const label = (v: number) => (Math.abs(v) >= 100 || Number.isInteger(v) ? v.toFixed(0) : v.toPrecision(2));

export function lineChart(c: Chart): string {
  const pts = c.series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const fx = (x: number) => (c.logX ? Math.log2(x) : x);
  const xs = pts.map(([x]) => fx(x));
  const xMin = c.xCategories ? 0 : Math.min(...xs);
  const xMax = c.xCategories ? c.xCategories.length - 1 : Math.max(...xs);
  const yStep = niceStep(Math.max(...pts.map(([, y]) => y), 1e-9));
  const yMax = Math.ceil(Math.max(...pts.map(([, y]) => y)) / yStep) * yStep || 1;
  const pw = W - M.left - M.right;
  const ph = H - M.top - M.bottom;
  const sx = (x: number) => M.left + (xMax === xMin ? pw / 2 : ((fx(x) - xMin) / (xMax - xMin)) * pw);
  const sy = (y: number) => M.top + ph - (y / yMax) * ph;
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">${esc(c.title)}</text>`,
  ];
  for (let y = 0; y <= yMax + 1e-9; y += yStep) {
    out.push(`<line x1="${M.left}" x2="${M.left + pw}" y1="${sy(y)}" y2="${sy(y)}" stroke="#ddd"/>`);
    out.push(`<text x="${M.left - 6}" y="${sy(y) + 4}" text-anchor="end">${label(y)}</text>`);
  }
  const xTicks = c.xCategories
    ? c.xCategories.map((name, i) => [i, name] as const)
    : [...new Set(pts.map(([x]) => x))].sort((a, b) => a - b).map((x) => [x, label(x)] as const);
  for (const [x, name] of xTicks) {
    out.push(`<line x1="${sx(x)}" x2="${sx(x)}" y1="${M.top + ph}" y2="${M.top + ph + 5}" stroke="#333"/>`);
    out.push(`<text x="${sx(x)}" y="${M.top + ph + 19}" text-anchor="middle">${esc(name)}</text>`);
  }
  out.push(`<line x1="${M.left}" x2="${M.left + pw}" y1="${M.top + ph}" y2="${M.top + ph}" stroke="#333"/>`);
  out.push(`<line x1="${M.left}" x2="${M.left}" y1="${M.top}" y2="${M.top + ph}" stroke="#333"/>`);
  out.push(`<text x="${M.left + pw / 2}" y="${H - 12}" text-anchor="middle">${esc(c.xLabel)}</text>`);
  out.push(`<text transform="translate(16 ${M.top + ph / 2}) rotate(-90)" text-anchor="middle">${esc(c.yLabel)}</text>`);
  c.series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const p = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    if (p.length > 1) out.push(`<polyline fill="none" stroke="${color}" stroke-width="2" points="${p.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(' ')}"/>`);
    for (const [x, y] of p) out.push(`<circle cx="${sx(x).toFixed(1)}" cy="${sy(y).toFixed(1)}" r="3.5" fill="${color}"/>`);
    const ly = M.top + 10 + i * 20;
    out.push(`<rect x="${W - M.right + 15}" y="${ly - 9}" width="14" height="10" fill="${color}"/>`);
    out.push(`<text x="${W - M.right + 35}" y="${ly}">${esc(s.name)}</text>`);
  });
  out.push('</svg>');
  return out.join('\n') + '\n';
}
