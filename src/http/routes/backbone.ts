/** GET /v1/backbone: the modules a delta may target, named as PEFT names them. */
import { Router } from 'express';
import type { BackboneInfo } from '../../backbone/types.js';
import type { ChatTemplate } from '../chat-template.js';

export function backboneRoutes(backbone: BackboneInfo, chatTemplate: Pick<ChatTemplate, 'fromModel'>): Router {
  const body = {
    name: backbone.name,
    family: backbone.family,
    fingerprint: backbone.fingerprint,
    // Added to the contract: `quantization` on a quantized module ({format, bits, block_size}); float modules have none.
    modules: backbone.modules.map((m) => ({
      name: m.name, kind: m.kind, in_features: m.inFeatures, out_features: m.outFeatures,
      ...(m.quantization ? { quantization: { format: m.quantization.format, bits: m.quantization.bits, block_size: m.quantization.blockSize } } : {}),
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
