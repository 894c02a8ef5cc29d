/**
 * Chat prompts, rendered with the model's own `chat_template` from
 * tokenizer_config.json through @huggingface/jinja, exactly as transformers
 * would render them; backbones without one get ChatML.
 */
import { Template } from '@huggingface/jinja';
import { ServeError } from '../errors.js';

export interface ChatMessage {
  role: string;
  content: string;
  name?: string;
}

export interface ChatTemplate {
  render(messages: ChatMessage[]): string;
  /** Whether the model ships its own template (false: the ChatML fallback), so clients can tell a chat model. */
  readonly fromModel: boolean;
}

export interface ChatTemplateOptions {
  /** The jinja source; null/undefined = DEFAULT_CHAT_TEMPLATE. */
  template?: string | null;
  bosToken?: string;
  eosToken?: string;
  /** Other special tokens templates may reference (`unk_token`, `pad_token`, ...). */
  specialTokens?: Record<string, string>;
}

/** ChatML, the format most instruction-tuned open models (and vLLM's fallback examples) use. */
export const DEFAULT_CHAT_TEMPLATE =
  "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

export function createChatTemplate(opts: ChatTemplateOptions = {}): ChatTemplate {
  const source = opts.template ?? DEFAULT_CHAT_TEMPLATE;
  let compiled: Template;
  try {
    compiled = new Template(source);
  } catch (err) {
    throw new Error(`chat_template does not compile: ${(err as Error).message}`);
  }
  const context = {
    ...opts.specialTokens,
    bos_token: opts.bosToken ?? '',
    eos_token: opts.eosToken ?? '',
    add_generation_prompt: true,
  };
  return {
    fromModel: opts.template != null,
    render(messages) {
      try {
        return compiled.render({ ...context, messages });
      } catch (err) {
        // Templates use raise_exception to refuse conversations they cannot format (roles out of order).
        throw new ServeError(422, 'invalid_request', `the model's chat template refused these messages: ${(err as Error).message}`);
      }
    },
  };
}

type TokenField = string | { content?: string } | null | undefined;
const tokenText = (t: TokenField) => (typeof t === 'string' ? t : t?.content ?? undefined);

/**
 * Reads the template and special tokens from a parsed tokenizer_config.json.
 * A list of named templates (newer transformers) yields the one named "default".
 */
export function chatTemplateFromTokenizerConfig(config: Record<string, unknown>): ChatTemplate {
  const raw = config.chat_template;
  let template: string | null = null;
  if (typeof raw === 'string') template = raw;
  else if (Array.isArray(raw)) {
    const named = raw as { name?: string; template?: string }[];
    template = (named.find((t) => t.name === 'default') ?? named[0])?.template ?? null;
  }
  const specialTokens: Record<string, string> = {};
  for (const key of ['unk_token', 'pad_token', 'sep_token', 'cls_token', 'mask_token']) {
    const text = tokenText(config[key] as TokenField);
    if (text !== undefined) specialTokens[key] = text;
  }
  return createChatTemplate({
    template,
    bosToken: tokenText(config.bos_token as TokenField),
    eosToken: tokenText(config.eos_token as TokenField),
    specialTokens,
  });
}
