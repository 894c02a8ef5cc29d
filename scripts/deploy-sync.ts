/** npm run deploy:sync: regenerates what deploy/ derives from its sources (the PrometheusRule). */
import { writeFileSync } from 'node:fs';
import { relative } from 'node:path';
import { PROMETHEUS_RULE_PATH, prometheusRuleManifest } from './lib/prometheus-rule.js';

writeFileSync(PROMETHEUS_RULE_PATH, prometheusRuleManifest());
console.log(`wrote ${relative(process.cwd(), PROMETHEUS_RULE_PATH)}`);
