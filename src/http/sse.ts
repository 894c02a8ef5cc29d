/**
 * Server-sent events. Headers go out with the first event, not before: until
 * then a failure (unknown task, full queue) can still be a proper status code.
 */
import type { Response } from 'express';

export class SseStream {
  private opened = false;

  constructor(private readonly res: Response) {}

  get started(): boolean {
    return this.opened;
  }

  /** Whether the client is still there to write to. */
  get writable(): boolean {
    return !this.res.destroyed && !this.res.writableEnded;
  }

  send(data: unknown): void {
    this.write(`data: ${JSON.stringify(data)}\n\n`);
  }

  /** OpenAI's terminator: not JSON, by design of their protocol. */
  done(): void {
    this.write('data: [DONE]\n\n');
  }

  end(): void {
    if (this.writable) this.res.end();
  }

  private write(chunk: string): void {
    if (!this.writable) return;
    if (!this.opened) {
      this.opened = true;
      this.res.status(200);
      this.res.setHeader('Content-Type', 'text/event-stream; charset=utf-8');
      this.res.setHeader('Cache-Control', 'no-cache, no-transform');
      // Reverse proxies (nginx) buffer responses unless told not to; tokens must flow as made.
      this.res.setHeader('X-Accel-Buffering', 'no');
      this.res.flushHeaders();
    }
    this.res.write(chunk);
  }
}
