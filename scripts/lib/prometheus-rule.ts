/**
 * The Kubernetes PrometheusRule is deploy/prometheus/rules.yml wrapped for the
 * Prometheus Operator: generated (npm run deploy:sync), so the rules have one
 * home; a deploy test fails when the generated file is stale.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parse, stringify } from 'yaml';
import { DEPLOY } from './paths.js';

export const PROMETHEUS_RULE_PATH = join(DEPLOY, 'kubernetes/base/prometheusrule.yaml');

export function prometheusRuleManifest(): string {
  const rules = parse(readFileSync(join(DEPLOY, 'prometheus/rules.yml'), 'utf8')) as { groups: unknown[] };
  const manifest = {
    apiVersion: 'monitoring.coreos.com/v1',
    kind: 'PrometheusRule',
    metadata: { name: 'deltaserve', namespace: 'deltaserve', labels: { 'app.kubernetes.io/name': 'deltaserve' } },
    spec: { groups: rules.groups },
  };
  return `# Generated from deploy/prometheus/rules.yml by \`npm run deploy:sync\`: edit that file, not this one.\n${stringify(manifest, { lineWidth: 0 })}`;
}
