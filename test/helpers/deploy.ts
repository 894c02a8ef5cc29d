/**
 * What the deploy tests share: reading deploy/'s manifests (and rendering the
 * kustomize overlays), validating each object against its kind's schema, and
 * pulling metric names out of PromQL with Prometheus' own grammar.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { parser as promqlParser } from '@prometheus-io/lezer-promql';
import { Ajv } from 'ajv';
import fastJsonPatch, { type Operation } from 'fast-json-patch';
import { parse, parseAllDocuments } from 'yaml';
import { DEPLOY } from '../../scripts/lib/paths.js';

export { DEPLOY };
export const KUBERNETES = join(DEPLOY, 'kubernetes');

export interface K8sObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string> };
  spec?: any;
  data?: Record<string, string>;
}

export const readYaml = <T = any>(path: string): T => parse(readFileSync(path, 'utf8')) as T;

/** Every document of a YAML file; a syntax error fails with the file's name. */
export function readDocuments(path: string): K8sObject[] {
  return parseAllDocuments(readFileSync(path, 'utf8')).map((doc) => {
    if (doc.errors.length) throw new Error(`${path}: ${doc.errors.map((e) => e.message).join('; ')}`);
    return doc.toJS() as K8sObject;
  }).filter((o) => o !== null);
}

interface Kustomization {
  resources?: string[];
  patches?: { target: { group?: string; version?: string; kind: string; name: string }; path: string }[];
}

/**
 * Renders a kustomization the way `kubectl kustomize` does for the subset
 * deploy/ uses, `resources` (files and folders) and JSON 6902 `patches` with a
 * target; anything else is refused, so the subset cannot grow unnoticed. Where
 * kubectl is installed, the tests compare this with its own rendering.
 */
export function renderKustomization(dir: string): K8sObject[] {
  const k = readYaml<Kustomization & Record<string, unknown>>(join(dir, 'kustomization.yaml'));
  const unknown = Object.keys(k).filter((key) => !['apiVersion', 'kind', 'resources', 'patches'].includes(key));
  if (unknown.length) throw new Error(`${dir}/kustomization.yaml uses ${unknown.join(', ')}, which renderKustomization does not implement`);
  const objects = (k.resources ?? []).flatMap((r) => {
    const path = join(dir, r);
    return statSync(path).isDirectory() ? renderKustomization(path) : readDocuments(path);
  });
  for (const patch of k.patches ?? []) {
    const { group = '', version, kind, name } = patch.target;
    const targets = objects.filter((o) => o.kind === kind && o.metadata.name === name && o.apiVersion === (group ? `${group}/${version}` : version));
    if (targets.length !== 1) throw new Error(`${dir}: patch ${patch.path} matches ${targets.length} objects`);
    const ops = readYaml<Operation[]>(join(dir, patch.path));
    objects[objects.indexOf(targets[0])] = fastJsonPatch.applyPatch(targets[0], ops, true, false).newDocument;
  }
  return objects;
}

/** `kubectl kustomize <dir>`'s objects, or null where kubectl is not installed. */
export function kubectlKustomize(dir: string): K8sObject[] | null {
  let out: string;
  try {
    out = execFileSync('kubectl', ['kustomize', dir], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw e;
  }
  return parseAllDocuments(out).map((d) => d.toJS() as K8sObject);
}

export const objectKey = (o: K8sObject) => `${o.apiVersion} ${o.kind} ${o.metadata.namespace ?? ''}/${o.metadata.name}`;

export function find(objects: K8sObject[], kind: string, name: string): K8sObject {
  const hit = objects.find((o) => o.kind === kind && o.metadata.name === name);
  if (!hit) throw new Error(`no ${kind} ${name} among ${objects.map(objectKey).join(', ')}`);
  return hit;
}

// --- schemas -------------------------------------------------------------------

/** The npm package holding each API group's models (JSON schemas compiled by ajv). */
const MODEL_PACKAGES: Record<string, string> = {
  '': 'kubernetes-models',
  apps: 'kubernetes-models',
  policy: 'kubernetes-models',
  autoscaling: 'kubernetes-models',
  'rbac.authorization.k8s.io': 'kubernetes-models',
  'gateway.networking.k8s.io': '@kubernetes-models/gateway-api',
  'monitoring.coreos.com': '@kubernetes-models/prometheus-operator',
};

/** CRDs no npm package carries, vendored as data under deploy/kubernetes/schemas/ with their source. */
const VENDORED_CRDS: Record<string, string> = {
  'inference.networking.k8s.io': 'inference.networking.k8s.io_inferencepools.yaml',
};

/**
 * A structural schema as the API server applies it: an object with declared
 * properties keeps no others (unknown fields are pruned, or refused under
 * kubectl's strict field validation), unless it says it preserves them.
 */
function structural(schema: any): any {
  if (Array.isArray(schema)) return schema.map(structural);
  if (!schema || typeof schema !== 'object') return schema;
  const out = Object.fromEntries(Object.entries(schema).map(([k, v]) => [k, structural(v)]));
  if (out.properties && out.additionalProperties === undefined && !out['x-kubernetes-preserve-unknown-fields']) out.additionalProperties = false;
  return out;
}

const ajv = new Ajv({ allErrors: true, strict: false, validateFormats: false });

function crdValidator(group: string, version: string, kind: string) {
  const file = VENDORED_CRDS[group];
  if (!file) return null;
  const crd = readDocuments(join(KUBERNETES, 'schemas', file))[0];
  const v = crd.spec.versions.find((x: { name: string }) => x.name === version);
  if (crd.spec.names.kind !== kind || !v) throw new Error(`${file} defines no ${group}/${version} ${kind}`);
  return ajv.compile(structural(v.schema.openAPIV3Schema));
}

/** Problems with `o` against its kind's schema; [] when it validates. Throws for a kind with no known schema. */
export async function schemaProblems(o: K8sObject): Promise<string[]> {
  const [group, version] = o.apiVersion.includes('/') ? o.apiVersion.split('/') : ['', o.apiVersion];
  const crd = crdValidator(group, version, o.kind);
  if (crd) return crd(o) ? [] : (crd.errors ?? []).map((e) => `${e.instancePath} ${e.message} ${JSON.stringify(e.params)}`);
  const pkg = MODEL_PACKAGES[group];
  if (!pkg) throw new Error(`no schema known for ${o.apiVersion} ${o.kind}`);
  const mod = await import(`${pkg}/${group ? `${group}/` : ''}${version}/${o.kind}`);
  try {
    new mod[o.kind](o).validate();
    return [];
  } catch (e) {
    return [(e as Error).message];
  }
}

// --- PromQL ------------------------------------------------------------------

/** Metric names a PromQL expression selects, read with Prometheus' own grammar (lezer-promql); a syntax error throws. */
export function promqlMetricNames(expr: string): string[] {
  const tree = promqlParser.parse(expr);
  const names: string[] = [];
  let error: number | null = null;
  tree.iterate({
    enter: (node) => {
      if (node.type.isError) error ??= node.from;
      if (node.name === 'VectorSelector') {
        const id = node.node.getChild('Identifier');
        if (id) names.push(expr.slice(id.from, id.to));
      }
    },
  });
  if (error !== null) throw new Error(`PromQL syntax error at ${error} in: ${expr}`);
  return names;
}

/** Sample names in a Prometheus text exposition (histograms' _bucket/_sum/_count included). */
export function exposedSampleNames(text: string): Set<string> {
  return new Set(text.split('\n').filter((l) => l && !l.startsWith('#')).map((l) => l.split(/[{ ]/)[0]));
}
