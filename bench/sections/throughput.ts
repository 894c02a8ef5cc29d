/** Section 3 (issue 5): 32 concurrent streams, bare vs 32 distinct LoRAs, through the real scheduler. */
import { fmt, median } from '../lib/common.js';
import { healthTable, LORA_RANK, throughputTable, tokensPerSecond, type ThroughputResult } from '../lib/serving.js';
import type { BenchSection, Goal } from '../lib/runner.js';
import { yes } from './goals.js';
import { STREAMS, throughput } from './serving-stack.js';

function throughputGoals(tp: ThroughputResult): Goal[] {
  const b = tp.bare.map(tokensPerSecond);
  const m = tp.mixed.map(tokensPerSecond);
  const rm = median(m) / median(b);
  const rb = Math.max(...m) / Math.max(...b);
  return [{
    what: 'Throughput: 32 streams over 32 distinct r16 LoRAs ≥ 0.9× all bare (issue 5)',
    measured: `${fmt(median(m))} vs ${fmt(median(b))} tokens/s = ${fmt(rm, 2)} (medians); best runs ${fmt(rb, 2)}`,
    met: `${yes(rm >= 0.9)} (medians), ${yes(rb >= 0.9)} (best runs)`,
  }];
}

export const section: BenchSection = {
  name: 'throughput',
  async run(ctx) {
    const tp = await throughput(ctx);
    return {
      goals: throughputGoals(tp),
      outputs: [{
        title: '3. Throughput: 32 concurrent streams, bare vs 32 distinct LoRAs (issue 5)',
        body: [
          `Through the real \`Scheduler\` and \`EngineClient\` worker (\`startServices\` with a temporary delta store), default config (max batch 32, max_loras 32); ` +
          `${STREAMS} PEFT LoRAs (rank ${LORA_RANK}, lora_alpha ${2 * LORA_RANK}, target_modules [c_attn], fan_in_fan_out) written as adapter_config.json + adapter_model.safetensors and registered through the registry. ` +
          'Tokens/s = generated tokens of all requests ÷ wall time from submitting the first to the last one finishing (prefill included).',
          throughputTable(tp),
          healthTable(tp),
        ].join('\n\n'),
      }],
    };
  },
};
