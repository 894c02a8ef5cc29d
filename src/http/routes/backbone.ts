/** GET /v1/backbone: the modules a delta may target, named as PEFT names them. */
import { Router } from 'express';
import type { BackboneInfo, Quantization } from '../../backbone/types.js';
import type { ChatTemplate } from '../chat-template.js';

function quantizationBody(q: Quantization) {
  if (q.format === 'MatMulNBits') return { format: q.format, bits: q.bits, block_size: q.blockSize };
  return { format: q.format, bits: q.bits, weight_type: q.weightType, per_channel: q.perChannel, activations: q.activations };
}

export function backboneRoutes(backbone: BackboneInfo, chatTemplate: Pick<ChatTemplate, 'fromModel'>): Router {
  const body = {
    name: backbone.name,
    family: backbone.family,
    fingerprint: backbone.fingerprint,
    // Added to the contract: `quantization` on a quantized module (MatMulNBits: {format, bits, block_size};
    // MatMulInteger: {format, bits, weight_type, per_channel, activations: "dynamic"}); float modules have none.
    modules: backbone.modules.map((m) => ({
      name: m.name, kind: m.kind, in_features: m.inFeatures, out_features: m.outFeatures,
      ...(m.quantization ? { quantization: quantizationBody(m.quantization) } : {}),
    })),
    default_targets: backbone.defaultTargets,
    // Added to the contract: true when the tokenizer ships a chat_template (chat routes fall back to ChatML otherwise).
    chat_template: chatTemplate.fromModel,
  };
  const router = Router();
  router.get('/v1/backbone', (_req, res) => {
    res.json(body);
  });
  return router;
}
