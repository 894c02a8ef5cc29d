/**
 * Stop strings over streamed text. Text that could be the start of a stop
 * string is held back until it either completes one (generation ends, and the
 * stop string never reaches the client) or stops matching (it is released).
 * Pieces arrive as the detokenizer emits them, so a stop string may span
 * any number of tokens.
 */

export interface StopResult {
  /** Text safe to stream now. */
  text: string;
  /** The stop string that just completed, if one did; `text` ends right before it. */
  stop: string | null;
}

export class StopSequenceMatcher {
  private readonly stops: string[];
  private held = '';
  private stopped: string | null = null;

  constructor(stops: readonly string[]) {
    this.stops = [...new Set(stops.filter((s) => s.length > 0))];
  }

  get done(): boolean {
    return this.stopped !== null;
  }

  push(piece: string): StopResult {
    if (this.stopped !== null) return { text: '', stop: this.stopped };
    const buffer = this.held + piece;

    // The earliest completed stop string wins; at one position, the longest.
    let at = -1;
    let which: string | null = null;
    for (const stop of this.stops) {
      const i = buffer.indexOf(stop);
      if (i >= 0 && (at < 0 || i < at || (i === at && stop.length > which!.length))) {
        at = i;
        which = stop;
      }
    }
    if (which !== null) {
      this.held = '';
      this.stopped = which;
      return { text: buffer.slice(0, at), stop: which };
    }

    const keep = this.longestPendingSuffix(buffer);
    this.held = buffer.slice(buffer.length - keep);
    return { text: buffer.slice(0, buffer.length - keep), stop: null };
  }

  /** The held-back text, once generation ends for another reason (eos, length). */
  flush(): string {
    const rest = this.held;
    this.held = '';
    return rest;
  }

  /** Length of the longest suffix of `buffer` that is a proper prefix of some stop string. */
  private longestPendingSuffix(buffer: string): number {
    let best = 0;
    for (const stop of this.stops) {
      for (let n = Math.min(stop.length - 1, buffer.length); n > best; n--) {
        if (buffer.endsWith(stop.slice(0, n))) {
          best = n;
          break;
        }
      }
    }
    return best;
  }
}
