/**
 * deploy/kubernetes: every manifest parses and validates against its kind's
 * schema (kubernetes-models from npm; the InferencePool CRD vendored from the
 * Gateway API Inference Extension), both overlays render (and, where kubectl
 * is installed, render exactly as `kubectl kustomize` does), and the objects
 * refer to each other correctly: the pool selects the pods, the picker reads
 * deltaserve's metric names, the HPA scales the Deployment, the grace period
 * outlasts the drain.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { parse } from 'yaml';
import { PROMETHEUS_RULE_PATH, prometheusRuleManifest } from '../../scripts/lib/prometheus-rule.js';
import {
  DEPLOY, KUBERNETES, find, kubectlKustomize, objectKey, readDocuments, readYaml, renderKustomization, schemaProblems, type K8sObject,
} from '../helpers/deploy.js';

const OVERLAYS = ['cpu', 'gpu'];
const rendered = Object.fromEntries(OVERLAYS.map((o) => [o, renderKustomization(join(KUBERNETES, 'overlays', o))]));
const base = renderKustomization(join(KUBERNETES, 'base'));

test('every manifest file parses, and every object in the base and both overlays validates against its kind\'s schema', async () => {
  const files = readdirSync(join(KUBERNETES, 'base')).filter((f) => f.endsWith('.yaml'));
  for (const f of files) assert.doesNotThrow(() => readDocuments(join(KUBERNETES, 'base', f)), f);
  const kinds = new Set<string>();
  for (const [name, objects] of [['base', base], ...Object.entries(rendered)] as [string, K8sObject[]][]) {
    for (const o of objects) {
      kinds.add(`${o.apiVersion} ${o.kind}`);
      assert.deepEqual(await schemaProblems(o), [], `${name}: ${objectKey(o)}`);
      assert.equal(o.metadata.namespace ?? (o.kind === 'Namespace' ? undefined : 'missing'), o.kind === 'Namespace' ? undefined : 'deltaserve', objectKey(o));
    }
  }
  // What the issue lists, each present and validated.
  for (const k of ['apps/v1 Deployment', 'v1 Service', 'v1 PersistentVolumeClaim', 'policy/v1 PodDisruptionBudget', 'autoscaling/v2 HorizontalPodAutoscaler',
    'monitoring.coreos.com/v1 ServiceMonitor', 'monitoring.coreos.com/v1 PrometheusRule', 'inference.networking.k8s.io/v1 InferencePool',
    'gateway.networking.k8s.io/v1 HTTPRoute', 'gateway.networking.k8s.io/v1 Gateway']) {
    assert.ok(kinds.has(k), `${k} is deployed`);
  }
});

test('the schemas catch what they should: a wrong type, a missing field, an unknown InferencePool field', async () => {
  const deployment = structuredClone(find(base, 'Deployment', 'deltaserve'));
  deployment.spec.template.spec.containers[0].ports[0].containerPort = '8080';
  assert.match((await schemaProblems(deployment)).join(), /containerPort must be integer/);
  const pool = structuredClone(find(base, 'InferencePool', 'deltaserve'));
  delete pool.spec.targetPorts;
  assert.match((await schemaProblems(pool)).join(), /targetPorts/);
  const typo = structuredClone(find(base, 'InferencePool', 'deltaserve'));
  typo.spec.endpointPickerRef.failuremode = 'FailOpen';
  assert.match((await schemaProblems(typo)).join(), /additional properties.*failuremode/);
  const hpa = structuredClone(find(base, 'HorizontalPodAutoscaler', 'deltaserve'));
  delete hpa.spec.scaleTargetRef.name;
  assert.match((await schemaProblems(hpa)).join(), /scaleTargetRef must have required property name/);
});

test('the overlays render as kubectl kustomize renders them (skipped where kubectl is not installed)', (t) => {
  for (const o of OVERLAYS) {
    const theirs = kubectlKustomize(join(KUBERNETES, 'overlays', o));
    if (!theirs) {
      t.skip('kubectl is not installed: the overlays were rendered by the tests\' own resources + JSON-patch renderer only');
      return;
    }
    const byKey = (objs: K8sObject[]) => Object.fromEntries(objs.map((x) => [objectKey(x), x]));
    assert.deepEqual(byKey(rendered[o]), byKey(theirs), o);
  }
});

test('overlays: cpu runs deltaserve:cpu on the CPU provider, gpu runs deltaserve:cuda with one GPU and tolerates GPU taints', () => {
  const container = (o: string) => find(rendered[o], 'Deployment', 'deltaserve').spec.template.spec.containers[0];
  const env = (o: string) => Object.fromEntries(container(o).env.filter((e: { value?: string }) => e.value !== undefined).map((e: { name: string; value: string }) => [e.name, e.value]));
  assert.equal(container('cpu').image, 'deltaserve:cpu');
  assert.equal(env('cpu').DELTASERVE_EP, 'cpu');
  assert.equal(container('gpu').image, 'deltaserve:cuda');
  assert.equal(env('gpu').DELTASERVE_EP, 'cuda');
  assert.equal(container('gpu').resources.limits['nvidia.com/gpu'], 1);
  assert.ok(find(rendered.gpu, 'Deployment', 'deltaserve').spec.template.spec.tolerations.some((x: { key: string }) => x.key === 'nvidia.com/gpu'));
  // The images' user is the one the pods run as.
  for (const f of ['Dockerfile', 'Dockerfile.cuda']) assert.match(readFileSync(join(DEPLOY, f), 'utf8'), /^USER 10001:10001$/m, f);
  assert.equal(find(base, 'Deployment', 'deltaserve').spec.template.spec.securityContext.runAsUser, 10001);
});

test('the deltaserve Deployment: probes, drain, shared store, resources', () => {
  const d = find(base, 'Deployment', 'deltaserve');
  const pod = d.spec.template.spec;
  const c = pod.containers[0];
  assert.equal(c.readinessProbe.httpGet.path, '/readyz');
  assert.equal(c.livenessProbe.httpGet.path, '/healthz');
  const env = Object.fromEntries(c.env.map((e: { name: string; value?: string }) => [e.name, e.value]));
  const drain = Number(env.DELTASERVE_DRAIN_SECONDS);
  const preStop = c.lifecycle.preStop.sleep.seconds;
  assert.ok(pod.terminationGracePeriodSeconds > preStop + drain,
    `grace ${pod.terminationGracePeriodSeconds}s outlasts the preStop sleep (${preStop}s) plus the drain deadline (${drain}s)`);
  assert.ok(c.resources.requests.cpu && c.resources.requests.memory && c.resources.limits.memory);
  const mount = c.volumeMounts.find((m: { mountPath: string }) => m.mountPath === env.DELTASERVE_DELTAS_DIR);
  const volume = pod.volumes.find((v: { name: string }) => v.name === mount.name);
  const claim = find(base, 'PersistentVolumeClaim', volume.persistentVolumeClaim.claimName);
  assert.deepEqual(claim.spec.accessModes, ['ReadWriteMany'], 'the delta store is shared by every replica');
  // A read-only root filesystem: everything the server writes has a volume.
  assert.equal(c.securityContext.readOnlyRootFilesystem, true);
  for (const path of [env.DELTASERVE_CACHE_DIR, '/tmp']) assert.ok(c.volumeMounts.some((m: { mountPath: string }) => m.mountPath === path), path);

  const service = find(base, 'Service', 'deltaserve');
  const podLabels = d.spec.template.metadata.labels;
  const selects = (selector: Record<string, string>) => Object.entries(selector).every(([k, v]) => podLabels[k] === v);
  assert.ok(selects(service.spec.selector));
  assert.ok(selects(find(base, 'PodDisruptionBudget', 'deltaserve').spec.selector.matchLabels));
  const monitor = find(base, 'ServiceMonitor', 'deltaserve');
  assert.ok(Object.entries(monitor.spec.selector.matchLabels).every(([k, v]) => service.metadata.labels?.[k] === v), 'the ServiceMonitor selects the Service');
  assert.ok(service.spec.ports.some((p: { name: string }) => p.name === monitor.spec.endpoints[0].port));
  assert.equal(monitor.spec.endpoints[0].path, '/metrics');
  const hpa = find(base, 'HorizontalPodAutoscaler', 'deltaserve');
  assert.deepEqual(hpa.spec.scaleTargetRef, { apiVersion: 'apps/v1', kind: 'Deployment', name: 'deltaserve' });
  assert.ok(hpa.spec.minReplicas >= 2 && find(base, 'PodDisruptionBudget', 'deltaserve').spec.minAvailable < hpa.spec.minReplicas,
    'the PDB lets a node drain evict one replica of the minimum');
});

/** Top-level fields of EndpointPickerConfig in v1.5.0 (apix/config/v1alpha1); the EPP decodes its config strictly. */
const EPP_CONFIG_FIELDS = ['apiVersion', 'kind', 'featureGates', 'plugins', 'schedulingProfiles', 'saturationDetector', 'dataLayer', 'flowControl', 'parser'];
/** Plugin types the v1.5.0 EPP registers, of those a deltaserve pool can use. */
const EPP_PLUGIN_TYPES = ['metrics-data-source', 'core-metrics-extractor', 'queue-scorer', 'kv-cache-utilization-scorer', 'lora-affinity-scorer',
  'running-requests-size-scorer', 'max-score-picker', 'random-picker', 'weighted-random-picker', 'single-profile-handler'];
/** Flags v1.5.0 refuses at start ("deprecated and cannot be used; configure metrics via engineConfigs"). */
const EPP_REFUSED_FLAGS = ['--total-queued-requests-metric', '--total-running-requests-metric', '--kv-cache-usage-percentage-metric', '--lora-info-metric', '--cache-info-metric'];

test('the inference gateway: HTTPRoute → InferencePool → the deltaserve pods, its picker configured with deltaserve\'s metrics', () => {
  const d = find(base, 'Deployment', 'deltaserve');
  const podLabels = d.spec.template.metadata.labels;
  const gateway = find(base, 'Gateway', 'inference-gateway');
  const route = find(base, 'HTTPRoute', 'deltaserve');
  const pool = find(base, 'InferencePool', 'deltaserve');
  assert.deepEqual(route.spec.parentRefs[0], { group: 'gateway.networking.k8s.io', kind: 'Gateway', name: gateway.metadata.name });
  assert.deepEqual(route.spec.rules[0].backendRefs[0], { group: 'inference.networking.k8s.io', kind: 'InferencePool', name: pool.metadata.name });
  assert.equal(pool.apiVersion, 'inference.networking.k8s.io/v1');
  assert.ok(Object.entries(pool.spec.selector.matchLabels).every(([k, v]) => podLabels[k] === v), 'the pool selects the deltaserve pods');
  assert.deepEqual(pool.spec.targetPorts.map((p: { number: number }) => p.number), d.spec.template.spec.containers[0].ports.map((p: { containerPort: number }) => p.containerPort));

  const eppService = find(base, 'Service', pool.spec.endpointPickerRef.name);
  assert.ok(eppService.spec.ports.some((p: { port: number }) => p.port === pool.spec.endpointPickerRef.port.number), 'the pool points at the picker\'s ext-proc port');
  const epp = find(base, 'Deployment', 'deltaserve-epp');
  const args: string[] = epp.spec.template.spec.containers[0].args;
  const flag = (name: string) => args[args.indexOf(name) + 1];
  assert.equal(flag('--pool-name'), pool.metadata.name);
  assert.equal(flag('--pool-namespace'), pool.metadata.namespace);
  assert.equal(flag('--pool-group'), 'inference.networking.k8s.io');
  for (const refused of EPP_REFUSED_FLAGS) assert.ok(!args.some((a) => a.startsWith(refused)), `${refused} makes the v1.5.0 picker exit`);

  const configMap = find(base, 'ConfigMap', epp.spec.template.spec.volumes[0].configMap.name);
  const mountPath = epp.spec.template.spec.containers[0].volumeMounts[0].mountPath;
  const configFile = flag('--config-file');
  assert.ok(configFile.startsWith(`${mountPath}/`));
  const config = parse(configMap.data![configFile.slice(mountPath.length + 1)]);
  assert.equal(config.kind, 'EndpointPickerConfig');
  assert.deepEqual(Object.keys(config).filter((k) => !EPP_CONFIG_FIELDS.includes(k)), [], 'no field the picker\'s strict decoder refuses');
  const plugins = new Map<string, { type: string; parameters?: any }>(config.plugins.map((p: { name?: string; type: string }) => [p.name ?? p.type, p]));
  for (const p of plugins.values()) assert.ok(EPP_PLUGIN_TYPES.includes(p.type), p.type);
  const refs = [
    ...config.schedulingProfiles.flatMap((s: { plugins: { pluginRef: string }[] }) => s.plugins.map((p) => p.pluginRef)),
    ...config.dataLayer.sources.flatMap((s: { pluginRef: string; extractors: { pluginRef: string }[] }) => [s.pluginRef, ...s.extractors.map((e) => e.pluginRef)]),
  ];
  for (const ref of refs) assert.ok(plugins.has(ref), `${ref} is a defined plugin`);
  const extractor = plugins.get('core-metrics-extractor')!.parameters;
  const engine = extractor.engineConfigs.find((e: { name: string }) => e.name === podLabels['inference.networking.k8s.io/engine-type']);
  assert.ok(engine, 'the pods\' engine-type label names an engine config');
  assert.equal(extractor.defaultEngine, engine.name);
  assert.deepEqual(
    [engine.queuedRequestsSpec, engine.runningRequestsSpec, engine.kvUsageSpec, engine.loraSpec],
    ['deltaserve_num_requests_waiting', 'deltaserve_num_requests_running', 'deltaserve_kv_cache_usage_perc', 'deltaserve_lora_requests_info'],
  );
  assert.ok(config.schedulingProfiles[0].plugins.some((p: { pluginRef: string }) => p.pluginRef === 'lora-affinity-scorer'), 'routes to pods that already hold the delta');

  const role = find(base, 'Role', 'deltaserve-epp');
  assert.ok(role.spec === undefined && (role as unknown as { rules: { resources: string[] }[] }).rules.some((r) => r.resources.includes('inferencepools')));
  assert.equal(epp.spec.template.spec.serviceAccountName, find(base, 'ServiceAccount', 'deltaserve-epp').metadata.name);
});

test('the PrometheusRule is deploy/prometheus/rules.yml, regenerated (npm run deploy:sync)', () => {
  assert.equal(readFileSync(PROMETHEUS_RULE_PATH, 'utf8'), prometheusRuleManifest(), 'stale: run npm run deploy:sync');
  assert.deepEqual(find(base, 'PrometheusRule', 'deltaserve').spec.groups, readYaml(join(DEPLOY, 'prometheus/rules.yml')).groups);
});
