/**
 * GET /: the web console. Hand-written ES modules from src/http/console/ and
 * uPlot's own build from node_modules, served as they are: no build step,
 * nothing fetched from a CDN, so the console works on an offline machine.
 * The page only calls the public API, like any other client.
 */
import { createRequire } from 'node:module';
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import express, { Router, type Response } from 'express';

const CONSOLE_DIR = fileURLToPath(new URL('../console/', import.meta.url));
const UPLOT_DIR = dirname(createRequire(import.meta.url).resolve('uplot/dist/uPlot.iife.min.js'));
/** What the page loads from uPlot's package, and nothing else of node_modules. */
const VENDOR_FILES = ['uPlot.iife.min.js', 'uPlot.min.css'];

/**
 * Only this origin's scripts, styles and API: prompts and the admin token can
 * reach no other host, and injected markup cannot run.
 */
const CONTENT_SECURITY_POLICY = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self'",
  "connect-src 'self'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
].join('; ');

function consoleHeaders(res: Response): void {
  res.setHeader('Content-Security-Policy', CONTENT_SECURITY_POLICY);
  res.setHeader('X-Content-Type-Options', 'nosniff');
  res.setHeader('Referrer-Policy', 'no-referrer');
  // Revalidated on every load (Last-Modified), so an upgraded server never runs a stale console.
  res.setHeader('Cache-Control', 'no-cache');
}

export function consoleRoutes(): Router {
  const router = Router();
  router.get('/', (_req, res) => {
    consoleHeaders(res);
    res.sendFile('index.html', { root: CONSOLE_DIR });
  });
  for (const name of VENDOR_FILES) {
    router.get(`/console/vendor/${name}`, (_req, res) => {
      consoleHeaders(res);
      res.sendFile(name, { root: UPLOT_DIR });
    });
  }
  router.use('/console', express.static(CONSOLE_DIR, { index: false, setHeaders: consoleHeaders }));
  return router;
}
