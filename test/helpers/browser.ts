/**
 * A real headless Chromium (Debian's /usr/bin/chromium, which scripts/ci-setup.sh
 * installs) driven by playwright-core, with a fresh profile each launch, and a
 * watch over each page: console errors, uncaught exceptions, and any request
 * that leaves the server's origin.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type BrowserContext, type Page } from 'playwright-core';

export const CHROMIUM = process.env.DELTASERVE_CHROMIUM ?? '/usr/bin/chromium';

/** Why browser tests cannot run here, or null when they can. */
export const browserMissing = existsSync(CHROMIUM)
  ? null
  : `${CHROMIUM} is not installed (scripts/ci-setup.sh installs Debian's chromium); the web console's browser tests did not run`;

/** Without the background-networking flags Chromium keeps calling Google's services on a closed network. */
const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

export interface Browser {
  context: BrowserContext;
  close(): Promise<void>;
}

export async function launchBrowser(viewport = { width: 1280, height: 900 }): Promise<Browser> {
  const profile = await mkdtemp(join(tmpdir(), 'deltaserve-chromium-'));
  const context = await chromium.launchPersistentContext(profile, { executablePath: CHROMIUM, headless: true, args: FLAGS, viewport });
  return {
    context,
    close: async () => {
      await context.close();
      await rm(profile, { recursive: true, force: true });
    },
  };
}

export interface PageWatch {
  /** console.error/warning messages and uncaught exceptions. */
  problems: string[];
  /** Every console message of any type, to check what the page writes. */
  messages: string[];
  /** Requests to anywhere but `origin`. */
  offOrigin: string[];
  /** Every request the page made, as "METHOD url". */
  requests: { method: string; url: string; headers: Record<string, string>; body: string | null }[];
}

export function watchPage(page: Page, origin: string): PageWatch {
  const watch: PageWatch = { problems: [], messages: [], offOrigin: [], requests: [] };
  page.on('console', (m) => {
    watch.messages.push(m.text());
    if (m.type() === 'error' || m.type() === 'warning') watch.problems.push(`console.${m.type()}: ${m.text()}`);
  });
  page.on('pageerror', (e) => watch.problems.push(`uncaught: ${e.message}`));
  page.on('request', (r) => {
    watch.requests.push({ method: r.method(), url: r.url(), headers: r.headers(), body: r.postData() });
    if (new URL(r.url()).origin !== origin && !r.url().startsWith('data:')) watch.offOrigin.push(r.url());
  });
  return watch;
}
