/**
 * deploy/Dockerfile*: no container engine runs here, so the images are checked
 * on this machine instead. Every path they copy exists (and is not ignored by
 * .dockerignore); the CPU image's own commands run in their order in a scratch
 * root standing in for the image's filesystem (npm ci --omit=dev, the demo
 * warm-up), then its CMD serves and its HEALTHCHECK passes against it. What
 * only an image build can do (users, apt, the CUDA base) is named, not run.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { DockerfileParser, type Instruction } from 'dockerfile-ast';
import { freePort } from '../../scripts/lib/local-stack.js';
import { REPO } from '../../scripts/lib/paths.js';
import { DEPLOY } from '../helpers/deploy.js';
import { pollUntil, scratch } from '../helpers/e2e-stack.js';

const instructions = (file: string) => DockerfileParser.parse(readFileSync(join(DEPLOY, file), 'utf8')).getInstructions();
const args = (i: Instruction) => i.getArguments().map((a) => a.getValue());

/** Commands that only make sense while building an image as root: run by `docker build`, not here. */
const IMAGE_ONLY = new Set(['groupadd', 'useradd', 'chown', 'apt-get', 'curl']);
/** `npm cache clean` only shrinks the image; here it would empty this machine's shared npm cache. */
const isImageOnly = (command: string) => IMAGE_ONLY.has(command.split(/\s+/)[0]) || /^npm cache clean\b/.test(command);

test('every path the Dockerfiles copy exists in the build context (the repository root) and is not in .dockerignore', () => {
  const ignored = readFileSync(join(REPO, '.dockerignore'), 'utf8').split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#'));
  for (const file of ['Dockerfile', 'Dockerfile.cuda']) {
    const copies = instructions(file).filter((i) => i.getKeyword() === 'COPY');
    assert.ok(copies.length >= 4, file);
    for (const c of copies) {
      for (const src of args(c).slice(0, -1)) {
        assert.ok(existsSync(join(REPO, src)), `${file}: COPY ${src} — no such path in the repository`);
        assert.ok(!ignored.some((pattern) => src === pattern || src.startsWith(`${pattern}/`)), `${file}: ${src} is excluded by .dockerignore`);
      }
    }
  }
});

test('the CUDA image runs the CPU image\'s project steps (its CUDA base and provider download are not run here)', () => {
  const steps = (file: string) => instructions(file)
    .filter((i) => ['COPY', 'ENV', 'USER', 'HEALTHCHECK', 'CMD', 'EXPOSE'].includes(i.getKeyword()))
    .map((i) => `${i.getKeyword()} ${i.getKeyword() === 'ENV' ? args(i).map((a) => a.split('=')[0]).join(' ') : i.getArgumentsContent()}`)
    // The CUDA image has no .npmrc: its npm ci names the provider itself.
    .map((s) => s.replace(' .npmrc', ''));
  assert.deepEqual(steps('Dockerfile.cuda'), steps('Dockerfile'));
  const npmCi = instructions('Dockerfile.cuda').find((i) => i.getKeyword() === 'RUN' && i.getArgumentsContent()!.includes('npm ci'))!;
  assert.match(npmCi.getArgumentsContent()!, /npm ci --omit=dev --onnxruntime-node-install=cuda12/);
});

test('the CPU image\'s commands run in order on this machine, then its CMD serves and its HEALTHCHECK passes', { timeout: 300_000 }, async (t) => {
  const work = await scratch('image');
  // The image's filesystem: every absolute path in RUN and ENV but a device (/dev/null) lands under `root`.
  const root = join(work.dir, 'root');
  const remap = (s: string) => s.replace(/(^|[\s='"])(\/[\w.\/-]*)/g, (all, before: string, path: string) => (path.startsWith('/dev/') ? all : `${before}${root}${path}`));
  const env: Record<string, string> = { PATH: process.env.PATH!, HOME: work.dir };
  let cwd = root;
  let cmd: string[] = [];
  let healthcheck: string[] = [];
  const notRun: string[] = [];
  let server: ReturnType<typeof spawn> | null = null;
  try {
    for (const i of instructions('Dockerfile')) {
      const a = args(i);
      switch (i.getKeyword()) {
        case 'FROM':
          assert.equal(a[0].match(/^node:(\d+)/)?.[1], process.versions.node.split('.')[0], 'the image has the Node.js major this machine runs');
          break;
        case 'WORKDIR':
          cwd = join(root, a[0]);
          mkdirSync(cwd, { recursive: true });
          break;
        case 'COPY':
          for (const src of a.slice(0, -1)) cpSync(join(REPO, src), join(cwd, a.at(-1)!, a.at(-1)!.endsWith('/') ? src : ''), { recursive: true });
          break;
        case 'ENV':
          for (const kv of a) {
            const [k, ...v] = kv.split('=');
            env[k] = remap(v.join('='));
          }
          break;
        case 'RUN':
          for (const command of i.getArgumentsContent()!.split('&&').map((c) => c.trim())) {
            if (isImageOnly(command)) notRun.push(command);
            else {
              try {
                execFileSync('sh', ['-c', remap(command)], { cwd, env, stdio: 'pipe', timeout: 240_000 });
              } catch (e) {
                assert.fail(`RUN ${command} failed:\n${(e as { stderr?: Buffer }).stderr?.toString() ?? e}`);
              }
            }
          }
          break;
        case 'USER':
          notRun.push(`USER ${a[0]}`);
          break;
        case 'HEALTHCHECK':
          healthcheck = JSON.parse(i.getArgumentsContent()!.replace(/^.*?\bCMD\s+/s, ''));
          break;
        case 'CMD':
          cmd = JSON.parse(i.getArgumentsContent()!);
          break;
      }
    }
    assert.ok(readdirSync(env.DELTASERVE_CACHE_DIR).length > 0, 'the warm-up generated the demo backbone into the image\'s cache');
    assert.ok(existsSync(join(cwd, 'node_modules/onnxruntime-node')) && !existsSync(join(cwd, 'node_modules/typescript')), 'production dependencies only');
    t.diagnostic(`run only by docker build: ${notRun.join(' | ')}`);

    // `docker run -e HOST=127.0.0.1 -e PORT=<free>`: the image's CMD on a loopback port.
    const port = String(await freePort());
    const runEnv = { ...env, HOST: '127.0.0.1', PORT: port };
    server = spawn(cmd[0], cmd.slice(1), { cwd, env: runEnv, stdio: 'ignore' });
    const url = `http://127.0.0.1:${port}`;
    await pollUntil(`${url}/readyz`, (s) => s === 200, 120_000);
    const generated = await fetch(`${url}/v1/generate`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ task: 'demo-lora', inputs: 'Hello', parameters: { max_new_tokens: 4 } }),
    });
    assert.equal(generated.status, 200, 'the image serves the demo deltas it copied');
    execFileSync(healthcheck[0], healthcheck.slice(1), { cwd, env: runEnv, timeout: 10_000 });
    server.kill('SIGTERM');
    const [code] = await new Promise<[number | null]>((r) => server!.on('exit', (c) => r([c])));
    assert.equal(code, 0, 'SIGTERM: drains and exits 0');
    server = null;
    assert.throws(() => execFileSync(healthcheck[0], healthcheck.slice(1), { cwd, env: runEnv, timeout: 10_000, stdio: 'pipe' }), 'the HEALTHCHECK fails once the server is gone');
  } finally {
    server?.kill('SIGKILL');
    await work.remove();
  }
});
