/** Reads a model directory in Optimum's layout and checks it is a usable decoder. */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { discoverDecoderIO, ModelFormatError, type DecoderIO } from './decoder-io.js';
import { externalDataFiles, readModel, type ModelProto } from './onnx/proto.js';
import { readFileWithProgress } from './read-progress.js';

export interface ModelDir {
  dir: string;
  model: ModelProto;
  config: Record<string, unknown>;
  io: DecoderIO;
  /** External data files beside model.onnx (models over protobuf's 2 GB keep their weights there). */
  externalFiles: string[];
}

const REQUIRED = ['model.onnx', 'config.json', 'tokenizer.json', 'tokenizer_config.json'];

export function readModelDir(dir: string): ModelDir {
  if (!existsSync(dir)) throw new ModelFormatError(`model directory ${dir} does not exist`);
  const missing = REQUIRED.filter((f) => !existsSync(join(dir, f)));
  if (missing.length) {
    const hint = missing.includes('model.onnx') && existsSync(join(dir, 'decoder_model_merged.onnx'))
      ? ' (this looks like an older Optimum export: re-export with `--task text-generation-with-past` and a current optimum, which writes a single model.onnx)'
      : ' (export the model with `optimum-cli export onnx --model <model> --task text-generation-with-past <dir>`)';
    throw new ModelFormatError(`model directory ${dir} lacks ${missing.join(', ')}${hint}`);
  }
  let config: Record<string, unknown>;
  try {
    config = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
  } catch (e) {
    throw new ModelFormatError(`${join(dir, 'config.json')} is not valid JSON: ${(e as Error).message}`);
  }
  let model: ModelProto;
  try {
    model = readModel(join(dir, 'model.onnx'), readFileWithProgress);
  } catch (e) {
    throw new ModelFormatError(`${join(dir, 'model.onnx')} is not a readable ONNX model: ${(e as Error).message}`);
  }
  let externalFiles: string[];
  try {
    externalFiles = externalDataFiles(model, dir);
  } catch (e) {
    throw new ModelFormatError(`${join(dir, 'model.onnx')}: ${(e as Error).message}`);
  }
  const missingData = externalFiles.filter((f) => !existsSync(join(dir, f)));
  if (missingData.length) {
    throw new ModelFormatError(`model directory ${dir} lacks the external data file(s) ${missingData.join(', ')} that model.onnx refers to; copy them beside model.onnx`);
  }
  const io = discoverDecoderIO(model.graph!, config);
  return { dir, model, config, io, externalFiles };
}
