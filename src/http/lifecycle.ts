/**
 * Whether the server admits work. The process wiring marks it ready once the
 * backbone is loaded and warmed; `serve` marks it draining on SIGTERM.
 */
export interface Readiness {
  ready(): boolean;
  draining(): boolean;
}

export class Lifecycle implements Readiness {
  private warmed = false;
  private leaving = false;

  markReady(): void {
    this.warmed = true;
  }

  startDraining(): void {
    this.leaving = true;
  }

  ready(): boolean {
    return this.warmed && !this.leaving;
  }

  draining(): boolean {
    return this.leaving;
  }
}
