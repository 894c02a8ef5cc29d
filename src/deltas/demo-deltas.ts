/**
 * Writes the demo deltas (one PEFT LoRA, one OpenDelta adapter, one OpenDelta
 * BitFit) for a backbone into a deltas dir, through the registry, so they are
 * validated and stored exactly like uploads. Deterministic: rerunning gives
 * the same files.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BackboneInfo, LinearModule } from '../backbone/types.js';
import { Registry } from './registry.js';
import { encodeSafetensors, type TensorToWrite } from './safetensors.js';
import type { DeltaRecord } from './types.js';

/** Where each kind goes when the backbone names no default targets of its own. */
const FALLBACK_TARGETS: Record<string, Record<string, string[]>> = {
  llama: { lora: ['q_proj', 'v_proj'], adapter: ['mlp.down_proj'], bitfit: ['self_attn.o_proj'] },
  gpt2: { lora: ['c_attn'], adapter: ['mlp.c_proj'], bitfit: ['attn.c_proj'] },
};

function targetsFor(backbone: BackboneInfo, kind: string): string[] {
  const targets = backbone.defaultTargets[kind] ?? FALLBACK_TARGETS[backbone.family]?.[kind];
  if (!targets) throw new Error(`no ${kind} targets for a ${backbone.family} backbone: give it defaultTargets.${kind}`);
  return targets;
}

const endsWith = (path: string, suffix: string) => path === suffix || path.endsWith(`.${suffix}`);
const selected = (backbone: BackboneInfo, targets: string[]) =>
  backbone.modules.filter((m) => targets.some((t) => endsWith(m.name, t)));

function uniform(seed: number) {
  let s = seed >>> 0;
  return (n: number, scale: number) => {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
      out[i] = (s / 2 ** 32 - 0.5) * 2 * scale;
    }
    return out;
  };
}

function f32(shape: number[], data: Float32Array): TensorToWrite {
  return { dtype: 'F32', shape, data };
}

function loraFiles(mods: LinearModule[], targets: string[], rank: number): Record<string, Uint8Array | string> {
  const rand = uniform(1);
  const tensors: Record<string, TensorToWrite> = {};
  for (const m of mods) {
    tensors[`base_model.model.${m.name}.lora_A.weight`] = f32([rank, m.inFeatures], rand(rank * m.inFeatures, 1 / Math.sqrt(m.inFeatures)));
    // Trained B is rarely zero; a visible B makes the task's effect on output visible.
    tensors[`base_model.model.${m.name}.lora_B.weight`] = f32([m.outFeatures, rank], rand(m.outFeatures * rank, 0.5));
  }
  const config = { peft_type: 'LORA', task_type: 'CAUSAL_LM', r: rank, lora_alpha: 2 * rank, target_modules: targets, bias: 'none', fan_in_fan_out: false };
  return { 'adapter_config.json': JSON.stringify(config, null, 2), 'adapter_model.safetensors': encodeSafetensors(tensors) };
}

function adapterFiles(mods: LinearModule[], targets: string[], bottleneck: number): Record<string, Uint8Array | string> {
  const rand = uniform(2);
  const tensors: Record<string, TensorToWrite> = {};
  for (const m of mods) {
    const p = `${m.name}.adapter.modulelist`;
    const d = m.outFeatures;
    tensors[`${p}.down_proj.weight`] = f32([bottleneck, d], rand(bottleneck * d, 1 / Math.sqrt(d)));
    tensors[`${p}.down_proj.bias`] = f32([bottleneck], rand(bottleneck, 0.1));
    tensors[`${p}.up_proj.weight`] = f32([d, bottleneck], rand(d * bottleneck, 0.5 / Math.sqrt(bottleneck)));
    tensors[`${p}.up_proj.bias`] = f32([d], rand(d, 0.05));
  }
  const config = { delta_type: 'adapter', modified_modules: targets, bottleneck_dim: bottleneck, non_linearity: 'gelu_new' };
  return { 'config.json': JSON.stringify(config, null, 2), 'model.safetensors': encodeSafetensors(tensors) };
}

function bitfitFiles(backbone: BackboneInfo, mods: LinearModule[], targets: string[]): Record<string, Uint8Array | string> {
  const rand = uniform(3);
  const tensors: Record<string, TensorToWrite> = {};
  for (const m of mods) {
    // OpenDelta saves the tuned bias itself: the backbone's own plus what training moved.
    const tuned = rand(m.outFeatures, 0.2);
    const own = backbone.biasOf(m.name);
    if (own) for (let i = 0; i < tuned.length; i++) tuned[i] += own[i];
    tensors[`${m.name}.bias`] = f32([m.outFeatures], tuned);
  }
  const config = { delta_type: 'bitfit', modified_modules: targets };
  return { 'config.json': JSON.stringify(config, null, 2), 'model.safetensors': encodeSafetensors(tensors) };
}

/** Registers (or replaces) demo-lora, demo-adapter and demo-bitfit for `backbone` in `deltasDir`. */
export async function makeDemoDeltas(backbone: BackboneInfo, deltasDir: string): Promise<DeltaRecord[]> {
  const registry = await Registry.open({ dir: deltasDir, backbone, cacheBytes: 1 });
  const plans: [string, Record<string, Uint8Array | string>][] = [];
  const lora = targetsFor(backbone, 'lora');
  plans.push(['demo-lora', loraFiles(selected(backbone, lora), lora, 8)]);
  const adapter = targetsFor(backbone, 'adapter');
  plans.push(['demo-adapter', adapterFiles(selected(backbone, adapter), adapter, 16)]);
  const bitfit = targetsFor(backbone, 'bitfit');
  plans.push(['demo-bitfit', bitfitFiles(backbone, selected(backbone, bitfit), bitfit)]);

  const records: DeltaRecord[] = [];
  for (const [id, files] of plans) {
    const dir = await mkdtemp(join(tmpdir(), `deltaserve-${id}-`));
    try {
      const list = [];
      for (const [name, content] of Object.entries(files)) {
        await writeFile(join(dir, name), content);
        list.push({ name, path: join(dir, name) });
      }
      records.push(await registry.register(id, list, { replace: true }));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }
  return records;
}
