/**
 * Reads a model directory and checks it is a usable decoder. Layouts: Optimum's
 * (`model.onnx` at the root) and transformers.js / onnx-community's
 * (`onnx/model.onnx`, `onnx/decoder_model_merged.onnx`, `onnx/model_fp16.onnx`).
 * A merged decoder (one If on `use_cache_branch` choosing between a graph
 * without past and one with it) is served through its with-past branch: the
 * engine always feeds a past, empty on a prompt's first chunk.
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { discoverDecoderIO, ModelFormatError, type DecoderIO } from './decoder-io.js';
import { externalDataFiles, readModel, type GraphProto, type ModelProto } from './onnx/proto.js';
import { readFileWithProgress } from './read-progress.js';

export interface ModelDir {
  dir: string;
  /** The ONNX file read, relative to `dir`. */
  modelFile: string;
  /** The folder holding it (external data files are relative to it). */
  modelDir: string;
  model: ModelProto;
  config: Record<string, unknown>;
  io: DecoderIO;
  /** External data files beside the model file (models over protobuf's 2 GB keep their weights there). */
  externalFiles: string[];
}

const REQUIRED = ['config.json', 'tokenizer.json', 'tokenizer_config.json'];
/** Where each layout keeps the decoder, in the order looked for: float32 before float16. */
export const MODEL_FILES = [
  'model.onnx', 'onnx/model.onnx', 'decoder_model_merged.onnx', 'onnx/decoder_model_merged.onnx',
  'model_fp16.onnx', 'onnx/model_fp16.onnx', 'onnx/decoder_model_merged_fp16.onnx',
];
const USE_CACHE_BRANCH = 'use_cache_branch';

export function readModelDir(dir: string): ModelDir {
  if (!existsSync(dir)) throw new ModelFormatError(`model directory ${dir} does not exist`);
  const modelFile = MODEL_FILES.find((f) => existsSync(join(dir, f)));
  const missing = [...(modelFile ? [] : [`a model file (${MODEL_FILES.join(', ')})`]), ...REQUIRED.filter((f) => !existsSync(join(dir, f)))];
  if (missing.length) {
    throw new ModelFormatError(`model directory ${dir} lacks ${missing.join(', ')} (export the model with \`optimum-cli export onnx --model <model> --task text-generation-with-past <dir>\`)`);
  }
  const modelPath = join(dir, modelFile!);
  const modelDir = dirname(modelPath);
  let config: Record<string, unknown>;
  try {
    config = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
  } catch (e) {
    throw new ModelFormatError(`${join(dir, 'config.json')} is not valid JSON: ${(e as Error).message}`);
  }
  let model: ModelProto;
  try {
    model = readModel(modelPath, readFileWithProgress);
  } catch (e) {
    throw new ModelFormatError(`${modelPath} is not a readable ONNX model: ${(e as Error).message}`);
  }
  let externalFiles: string[];
  try {
    externalFiles = externalDataFiles(model, modelDir);
  } catch (e) {
    throw new ModelFormatError(`${modelPath}: ${(e as Error).message}`);
  }
  const missingData = externalFiles.filter((f) => !existsSync(join(modelDir, f)));
  if (missingData.length) {
    throw new ModelFormatError(`model directory ${dir} lacks the external data file(s) ${missingData.join(', ')} that ${modelFile} refers to; copy them beside it`);
  }
  model.graph = withPastBranch(model.graph!, modelFile!);
  const io = discoverDecoderIO(model.graph, config);
  return { dir, modelFile: modelFile!, modelDir, model, config, io, externalFiles };
}

/**
 * A merged decoder's graph with its If on use_cache_branch replaced by the
 * with-past (then) branch inlined: its nodes and initializers join the outer
 * graph, its outputs take the If's output names (logits, present.N.*).
 */
function withPastBranch(graph: GraphProto, file: string): GraphProto {
  if (!(graph.input ?? []).some((i) => i.name === USE_CACHE_BRANCH)) return graph;
  const ifs = (graph.node ?? []).filter((n) => n.opType === 'If' && n.input?.[0] === USE_CACHE_BRANCH);
  const then = ifs[0]?.attribute?.find((a) => a.name === 'then_branch')?.g;
  if (ifs.length !== 1 || !then) {
    throw new ModelFormatError(`${file} has a ${USE_CACHE_BRANCH} input but ${ifs.length} If nodes on it; expected one If whose then_branch is the decoder with past (Optimum's merged decoder)`);
  }
  const node = ifs[0];
  const rename = new Map((then.output ?? []).map((o, i) => [o.name!, node.output![i]]));
  const renamed = (names: string[] | null | undefined) => (names ?? []).map((x) => rename.get(x) ?? x);
  return {
    ...graph,
    node: [
      ...(graph.node ?? []).filter((n) => n !== node),
      ...(then.node ?? []).map((n) => ({ ...n, input: renamed(n.input), output: renamed(n.output) })),
    ],
    initializer: [...(graph.initializer ?? []), ...(then.initializer ?? [])],
    input: (graph.input ?? []).filter((i) => i.name !== USE_CACHE_BRANCH),
  };
}
