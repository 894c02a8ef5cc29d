/**
 * What the delta banks of a batch take, computed from the rows' deltas alone
 * (no buffers, no ORT): the scheduler admits a row only while the banks with
 * it fit DELTASERVE_BANK_BYTES. Every row holds a slice of each bank its
 * batch writes, padded to the largest size of each padded axis on the site; the banks allocate
 * that, plus up to as much again in row capacity while the batch changes size.
 */
import { sliceDims, type SiteLayout } from '../backbone/rewrite/delta-sites.js';
import { graphSite } from '../deltas/kinds/index.js';
import type { LoadedDelta } from '../deltas/types.js';

export function bankBytesFor(layouts: readonly SiteLayout[], rows: readonly (LoadedDelta | null)[]): number {
  const modules = new Map(layouts.map((l) => [l.module, l]));
  const used = new Map<string, { layout: SiteLayout; site: string; axes: Record<string, number>; keys: Set<string> }>();
  for (const delta of rows) {
    for (const s of delta?.sites ?? []) {
      const id = `${s.module}\u0000${s.site}`;
      const g = used.get(id) ?? { layout: modules.get(s.module)!, site: s.site, axes: {}, keys: new Set<string>() };
      for (const [axis, size] of Object.entries(s.axes)) g.axes[axis] = Math.max(g.axes[axis] ?? 0, size);
      for (const key of Object.keys(s.data)) g.keys.add(key);
      used.set(id, g);
    }
  }
  let floats = 0;
  for (const g of used.values()) {
    for (const spec of graphSite(g.site).banks) {
      if (!g.keys.has(spec.key)) continue;
      const [a, b] = sliceDims(spec, g.layout, g.axes);
      floats += rows.length * a * b;
    }
  }
  return 4 * floats;
}
