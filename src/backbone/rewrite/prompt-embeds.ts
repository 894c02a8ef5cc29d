/**
 * An embeddings input beside the token ids, for prompt tuning and P-tuning:
 * an id ≥ vocab_size reads row (id − vocab_size) of `prompt_embeds` instead
 * of the embedding table. The engine runs a task's virtual tokens through the
 * frozen backbone once this way (ids vocab_size.., positions 0.., PEFT's
 * `inputs_embeds = cat(prompts, embeds)`) and keeps the K/V they leave as the
 * task's KV prefix. Every other step feeds one zero row, and reads none of it.
 *
 * The token embedding is the Gather of `input_ids` from a [vocab, hidden]
 * initializer, as exporters write it; what the model does after it (GPT-2
 * adds position embeddings, Gemma scales) applies to virtual tokens alike,
 * as it does to PEFT's inputs_embeds.
 */
import * as ort from 'onnxruntime-node';
import { DataType } from '../onnx/graph-builder.js';
import { dimsOf } from '../onnx/proto.js';
import type { GraphEditor } from './editor.js';

/**
 * [virtual tokens, hidden] float: rows read by ids vocab_size, vocab_size + 1, …
 * Its width is symbolic, so a step without virtual tokens feeds one [1, 1]
 * zero (the final Where broadcasts it and takes none of it).
 */
export const PROMPT_EMBEDS = 'prompt_embeds';

/** The feed of a run without virtual tokens. */
export const noPromptEmbeds = (): ort.Tensor => new ort.Tensor('float32', new Float32Array(1), [1, 1]);

/** Adds the input; false when no embedding Gather of input_ids is found (then nothing changes). */
export function addPromptEmbeds(g: GraphEditor, vocabSize: number): boolean {
  const idx = g.index();
  const gather = g.nodes.find((n) => n.opType === 'Gather' && n.input?.[1] === 'input_ids' && idx.initializers.has(n.input[0]));
  if (!gather) return false;
  const table = idx.initializers.get(gather.input![0])!;
  const dims = dimsOf(table);
  if (dims.length !== 2 || dims[0] < vocabSize) return false;
  const out = gather.output![0];
  const fromTable = `${out}/vocab`;
  g.input(PROMPT_EMBEDS, DataType.FLOAT, ['virtual_tokens', 'embed_dim']);
  g.scope('/deltaserve/prompt_embeds', () => {
    const ids = 'input_ids';
    const vocab = g.ints([vocabSize], []);
    const real = g.op('Less', [ids, vocab]);
    const zero = g.ints([0], []);
    // The table's own Gather stays (its attributes too), reading a virtual token's id as 0.
    gather.input = [gather.input![0], g.op('Where', [real, ids, zero])];
    gather.output = [fromTable];
    const rows = g.op('Gather', [PROMPT_EMBEDS, g.op('Where', [real, zero, g.op('Sub', [ids, vocab])])], { axis: 0 });
    // The input is float32 whatever the graph computes in (a float16 export's table): rows in the table's type.
    const tableType = table.dataType ?? DataType.FLOAT;
    const virt = tableType === DataType.FLOAT ? rows : g.op('Cast', [rows], { to: tableType });
    // [batch, seq] → [batch, seq, 1], with Reshape (Unsqueeze changed signature at opset 13).
    const real3 = g.op('Reshape', [real, g.op('Concat', [g.op('Shape', [ids]), g.ints([1])], { axis: 0 })]);
    g.opNamed('Where', [real3, fromTable, virt], out);
  });
  return true;
}
