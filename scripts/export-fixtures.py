#!/usr/bin/python3
"""Real torch exports for deltaserve's tests and benchmark, with PyTorch as the oracle.

Plain-PyTorch decoders written to Hugging Face's module names and math (no
transformers install needed): GPT-2 (eager attention, Conv1D, the fixed causal
`attn.bias` buffer, tied lm_head), Llama (RMSNorm, rotary tables, grouped-query
attention through `repeat_kv`, final `logits.float()`) and a Qwen2-style model
(Llama's math with biases on q/k/v and tied embeddings). Each is exported by
torch.onnx.export (opset 14) with Optimum's `text-generation-with-past` input
and output names and dynamic axes, beside config.json, generation_config.json
and a byte-level tokenizer of our own. Each gets a PEFT-format LoRA (written
here: adapter_config.json + adapter_model.safetensors with PEFT's key names),
and PyTorch's own greedy token ids are recorded, by full recompute (no cache),
for the bare model and for the model with the LoRA merged into its weights.

Usage (Debian: python3-torch, python3-onnx, libopenblas0-pthread):
  /usr/bin/python3 scripts/export-fixtures.py                 # test/fixtures/torch/<name>/ (tiny, committed)
  /usr/bin/python3 scripts/export-fixtures.py --full OUT_DIR  # GPT-2 small shapes (124M) for `npm run bench`
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

OPSET = 14
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- tokenizer
def byte_to_unicode():
    """GPT-2's reversible byte -> printable unicode map."""
    printable = lambda b: 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF
    out, nxt = [], 256
    for b in range(256):
        if printable(b):
            out.append(chr(b))
        else:
            out.append(chr(nxt))
            nxt += 1
    return out


def byte_tokenizer(vocab_size, specials, bos, eos, add_bos, max_len, template):
    """A byte-level BPE tokenizer.json (no merges: one token per byte; ids 0..255 = bytes)."""
    vocab = {s: b for b, s in enumerate(byte_to_unicode())}
    ids = {s: 256 + i for i, s in enumerate(specials)}
    for n, i in enumerate(range(256 + len(specials), vocab_size)):
        vocab["<|unused_%d|>" % n] = i
    added = [dict(id=ids[s], content=s, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for s in specials]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    post = ({"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {bos: {"id": bos, "ids": [ids[bos]], "tokens": [bos]}}}
            if add_bos else {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True})
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": byte_level, "post_processor": post, "decoder": byte_level,
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": vocab, "merges": []}}
    cfg = {"add_bos_token": add_bos, "add_eos_token": False, "add_prefix_space": False,
           "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
           "bos_token": bos, "eos_token": eos, "pad_token": eos, "unk_token": None,
           "clean_up_tokenization_spaces": False, "model_max_length": max_len,
           "tokenizer_class": "PreTrainedTokenizerFast" if add_bos else "GPT2TokenizerFast",
           "chat_template": template}

    def encode(text):
        return ([ids[bos]] if add_bos else []) + list(text.encode("utf-8"))
    return tok, cfg, ids, encode


# --------------------------------------------------------------------------- GPT-2 (HF modeling_gpt2, eager)
class Conv1D(nn.Module):
    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf).normal_(std=0.02))
        self.bias = nn.Parameter(torch.zeros(nf).normal_(std=0.02))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Attention(nn.Module):
    def __init__(self, c, dtype_min):
        super().__init__()
        n = c["n_positions"]
        self.register_buffer("bias", torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n), persistent=False)
        self.embed_dim, self.num_heads = c["n_embd"], c["n_head"]
        self.head_dim = self.embed_dim // self.num_heads
        self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)
        self.c_proj = Conv1D(self.embed_dim, self.embed_dim)
        self.dtype_min = dtype_min

    def _split_heads(self, t):
        return t.view(t.size()[:-1] + (self.num_heads, self.head_dim)).permute(0, 2, 1, 3)

    def _attn(self, query, key, value, attention_mask):
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        attn_weights = attn_weights / torch.full([], value.size(-1) ** 0.5, dtype=attn_weights.dtype)
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length: key_length, :key_length]
        mask_value = torch.full([], self.dtype_min, dtype=attn_weights.dtype)
        attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        attn_weights = attn_weights + attention_mask
        attn_weights = F.softmax(attn_weights, dim=-1)
        return torch.matmul(attn_weights, value)

    def forward(self, hidden_states, layer_past, attention_mask):
        query, key, value = self.c_attn(hidden_states).split(self.embed_dim, dim=2)
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        if layer_past is not None:
            key = torch.cat((layer_past[0], key), dim=-2)
            value = torch.cat((layer_past[1], value), dim=-2)
        present = (key, value)
        a = self._attn(query, key, value, attention_mask)
        a = a.permute(0, 2, 1, 3).contiguous()
        a = a.view(a.size()[:-2] + (self.num_heads * self.head_dim,))
        return self.c_proj(a), present


class GPT2MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = Conv1D(4 * c["n_embd"], c["n_embd"])
        self.c_proj = Conv1D(c["n_embd"], 4 * c["n_embd"])

    def forward(self, x):
        return self.c_proj(gelu_new(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, c, dtype_min):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c["n_embd"], eps=c["layer_norm_epsilon"])
        self.attn = GPT2Attention(c, dtype_min)
        self.ln_2 = nn.LayerNorm(c["n_embd"], eps=c["layer_norm_epsilon"])
        self.mlp = GPT2MLP(c)

    def forward(self, h, layer_past, attention_mask):
        a, present = self.attn(self.ln_1(h), layer_past, attention_mask)
        h = a + h
        return h + self.mlp(self.ln_2(h)), present


class GPT2Model(nn.Module):
    def __init__(self, c, dtype_min):
        super().__init__()
        self.wte = nn.Embedding(c["vocab_size"], c["n_embd"])
        self.wpe = nn.Embedding(c["n_positions"], c["n_embd"])
        self.h = nn.ModuleList([GPT2Block(c, dtype_min) for _ in range(c["n_layer"])])
        self.ln_f = nn.LayerNorm(c["n_embd"], eps=c["layer_norm_epsilon"])
        self.dtype_min = dtype_min

    def forward(self, input_ids, attention_mask, position_ids, past):
        batch_size = input_ids.shape[0]
        attention_mask = attention_mask.view(batch_size, -1)[:, None, None, :]
        attention_mask = attention_mask.to(self.wte.weight.dtype)
        attention_mask = (1.0 - attention_mask) * self.dtype_min
        h = self.wte(input_ids) + self.wpe(position_ids)
        presents = []
        for i, block in enumerate(self.h):
            h, present = block(h, past[i] if past is not None else None, attention_mask)
            presents.append(present)
        return self.ln_f(h), presents


class GPT2LMHeadModel(nn.Module):
    def __init__(self, c, dtype_min=torch.finfo(torch.float32).min):
        super().__init__()
        self.transformer = GPT2Model(c, dtype_min)
        self.lm_head = nn.Linear(c["n_embd"], c["vocab_size"], bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied

    def forward(self, input_ids, attention_mask, position_ids, past=None):
        h, presents = self.transformer(input_ids, attention_mask, position_ids, past)
        return self.lm_head(h), presents


# --------------------------------------------------------------------------- Llama / Qwen2 (HF modeling_llama 4.36, eager)
class LlamaRMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size) + 0.1 * torch.randn(size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, dim, max_position_embeddings, base):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        t = torch.arange(max_position_embeddings, dtype=inv_freq.dtype)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, x, seq_len):
        return self.cos_cached[:seq_len].to(dtype=x.dtype), self.sin_cached[:seq_len].to(dtype=x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids):
    cos = cos[position_ids].unsqueeze(1)
    sin = sin[position_ids].unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states, n_rep):
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


class LlamaAttention(nn.Module):
    def __init__(self, c, qkv_bias):
        super().__init__()
        self.hidden_size = c["hidden_size"]
        self.num_heads = c["num_attention_heads"]
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = c["num_key_value_heads"]
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(self.head_dim, c["max_position_embeddings"], c["rope_theta"])

    def forward(self, hidden_states, attention_mask, position_ids, past_key_value):
        bsz, q_len, _ = hidden_states.size()
        q = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        kv_seq_len = k.shape[-2]
        if past_key_value is not None:
            kv_seq_len += past_key_value[0].shape[-2]
        cos, sin = self.rotary_emb(v, seq_len=kv_seq_len)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, position_ids)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=2)
            v = torch.cat([past_key_value[1], v], dim=2)
        present = (k, v)
        k = repeat_kv(k, self.num_key_value_groups)
        v = repeat_kv(v, self.num_key_value_groups)
        attn_weights = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        attn_weights = attn_weights + attention_mask
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
        attn_output = torch.matmul(attn_weights, v)
        attn_output = attn_output.transpose(1, 2).contiguous().reshape(bsz, q_len, self.hidden_size)
        return self.o_proj(attn_output), present


class LlamaMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, i = c["hidden_size"], c["intermediate_size"]
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c, qkv_bias):
        super().__init__()
        self.self_attn = LlamaAttention(c, qkv_bias)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = LlamaRMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = LlamaRMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, h, attention_mask, position_ids, past_key_value):
        a, present = self.self_attn(self.input_layernorm(h), attention_mask, position_ids, past_key_value)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), present


class LlamaModel(nn.Module):
    def __init__(self, c, qkv_bias, dtype_min):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList([LlamaDecoderLayer(c, qkv_bias) for _ in range(c["num_hidden_layers"])])
        self.norm = LlamaRMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.dtype_min = dtype_min

    def causal_mask(self, attention_mask, bsz, tgt_len, past_len, dtype):
        """_prepare_4d_causal_attention_mask: causal part over the new tokens, padding part from attention_mask."""
        mask = torch.full((tgt_len, tgt_len), self.dtype_min)
        mask_cond = torch.arange(mask.size(-1))
        mask.masked_fill_(mask_cond < (mask_cond + 1).view(mask.size(-1), 1), 0)
        mask = mask.to(dtype)
        mask = torch.cat([torch.zeros(tgt_len, past_len, dtype=dtype), mask], dim=-1)
        causal = mask[None, None, :, :].expand(bsz, 1, tgt_len, tgt_len + past_len)
        src_len = attention_mask.shape[-1]
        expanded = attention_mask[:, None, None, :].expand(bsz, 1, tgt_len, src_len).to(dtype)
        inverted = 1.0 - expanded
        return causal.masked_fill(inverted.to(torch.bool), self.dtype_min)

    def forward(self, input_ids, attention_mask, position_ids, past):
        bsz, seq_len = input_ids.shape
        past_len = past[0][0].shape[2] if past is not None else 0
        h = self.embed_tokens(input_ids)
        mask = self.causal_mask(attention_mask, bsz, seq_len, past_len, h.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            h, present = layer(h, mask, position_ids, past[i] if past is not None else None)
            presents.append(present)
        return self.norm(h), presents


class LlamaForCausalLM(nn.Module):
    def __init__(self, c, qkv_bias=False, tied=False, dtype_min=torch.finfo(torch.float32).min):
        super().__init__()
        self.model = LlamaModel(c, qkv_bias, dtype_min)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask, position_ids, past=None):
        h, presents = self.model(input_ids, attention_mask, position_ids, past)
        logits = self.lm_head(h)
        logits = logits.float()
        return logits, presents


# --------------------------------------------------------------------------- the models we export
def gpt2_config(full):
    c = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=50257 if full else 320,
             n_embd=768 if full else 64, n_head=12 if full else 4, n_layer=12 if full else 2,
             n_positions=1024 if full else 128, n_ctx=1024 if full else 128, layer_norm_epsilon=1e-5,
             activation_function="gelu_new", bos_token_id=256, eos_token_id=256, tie_word_embeddings=True)
    return c


def llama_config(qwen):
    c = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=96 if not qwen else 128, rms_norm_eps=1e-6,
             rope_theta=10000.0 if not qwen else 1000000.0, hidden_act="silu", bos_token_id=256, eos_token_id=257,
             tie_word_embeddings=qwen, torch_dtype="float32")
    c.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"]) if qwen else \
        c.update(model_type="llama", architectures=["LlamaForCausalLM"])
    return c


def init_weights(model, seed):
    """Random weights large enough that greedy decoding is not a run of ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight") or ".ln_" in name or name.startswith("transformer.ln_f"):
                if name.endswith("bias"):
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "wte" in name or "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "wpe" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[0] if p.dim() == 2 and "c_" in name else (p.shape[-1] if p.dim() == 2 else 64)
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in) * (1.0 if p.dim() == 2 else 0.1))


# --------------------------------------------------------------------------- export
def flat_forward(model, layers):
    """Optimum's signature: input_ids, attention_mask, position_ids, past_key_values.N.key/value -> logits, present.N.*
    Set on the model itself (not a wrapper module), so node scopes start at the model's own names
    (/transformer/h.0/attn/c_attn/Gemm), as in a transformers export."""
    inner = model.forward

    def forward(input_ids, attention_mask, position_ids, *flat_past):
        past = [(flat_past[2 * i], flat_past[2 * i + 1]) for i in range(layers)] if flat_past else None
        logits, presents = inner(input_ids, attention_mask, position_ids, past)
        return (logits,) + tuple(t for kv in presents for t in kv)
    return forward


def export_onnx(model, layers, kv_heads, head_dim, path, with_past=True):
    names_past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")] if with_past else []
    names_present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    b, s, p = 2, 3, 4 if with_past else 0
    dummy = (torch.randint(0, 200, (b, s)), torch.ones(b, p + s, dtype=torch.int64),
             torch.arange(p, p + s).unsqueeze(0).expand(b, s).contiguous())
    past = tuple(torch.randn(b, kv_heads, p, head_dim) for _ in names_past)
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in names_past})
    axes.update({n: {0: "batch_size", 2: "past_sequence_length + 1" if with_past else "sequence_length"} for n in names_present})
    model.forward = flat_forward(model, layers)
    try:
        with torch.no_grad():
            torch.onnx.export(model, dummy + past, path, opset_version=OPSET,
                              input_names=["input_ids", "attention_mask", "position_ids"] + names_past,
                              output_names=["logits"] + names_present, dynamic_axes=axes, do_constant_folding=True)
    finally:
        del model.forward


# --------------------------------------------------------------------------- onnx-community layouts
def merge_decoders(no_past_path, with_past_path, out_path):
    """Optimum's decoder_model_merged.onnx: one If on use_cache_branch, then = with past, else = without."""
    import onnx
    from onnx import helper, TensorProto
    a, b = onnx.load(no_past_path), onnx.load(with_past_path)

    def branch(m, tag):
        g = m.graph
        rename = {o.name: f"{o.name}/{tag}" for o in g.output}
        for n in g.node:
            n.output[:] = [rename.get(x, x) for x in n.output]
            n.input[:] = [rename.get(x, x) for x in n.input]
        outs = []
        for o in g.output:
            v = onnx.ValueInfoProto()
            v.CopyFrom(o)
            v.name = rename[o.name]
            outs.append(v)
        return helper.make_graph(list(g.node), tag, [], outs, list(g.initializer))
    outer_out = [o for o in b.graph.output]
    if_node = helper.make_node("If", ["use_cache_branch"], [o.name for o in outer_out], name="optimum::if",
                               then_branch=branch(b, "with_past"), else_branch=branch(a, "without_past"))
    inputs = list(b.graph.input) + [helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])]
    g = helper.make_graph([if_node], "merged", inputs, outer_out)
    m = helper.make_model(g, opset_imports=b.opset_import, producer_name="deltaserve export-fixtures (Optimum's merge)")
    m.ir_version = b.ir_version
    onnx.save(m, out_path)


def to_float16(in_path, out_path, keep_float_outputs=()):
    """A float16 copy of a float32 export: initializers, constants, casts and float I/O in float16."""
    import onnx
    from onnx import numpy_helper, TensorProto as T
    m = onnx.load(in_path)
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == T.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == T.FLOAT:
                arr = np.clip(numpy_helper.to_array(a.t), -65504, 65504).astype(np.float16)
                a.t.CopyFrom(numpy_helper.from_array(arr))
            if n.op_type == "Cast" and a.name == "to" and a.i == T.FLOAT and n.output[0] not in keep_float_outputs:
                a.i = T.FLOAT16
    for v in list(g.input) + list(g.output):
        if v.type.tensor_type.elem_type == T.FLOAT and v.name not in keep_float_outputs:
            v.type.tensor_type.elem_type = T.FLOAT16
    del g.value_info[:]
    onnx.save(m, out_path)


def copy_text_files(src, dst):
    os.makedirs(dst, exist_ok=True)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(src, f)) as i, open(os.path.join(dst, f), "w") as o:
            o.write(i.read())


def build_merged(name):
    """<name>-onnx-community/: the same weights as <name> in onnx/decoder_model_merged.onnx."""
    src = os.path.join(ROOT, "test", "fixtures", "torch", name)
    dst = os.path.join(ROOT, "test", "fixtures", "torch", f"{name}-onnx-community")
    os.makedirs(os.path.join(dst, "onnx"), exist_ok=True)
    copy_text_files(src, dst)
    model, c, layers, kv_heads, head_dim = make_model(name)
    tmp = os.path.join(dst, "no_past.tmp.onnx")
    export_onnx(model, layers, kv_heads, head_dim, tmp, with_past=False)
    merge_decoders(tmp, os.path.join(src, "model.onnx"), os.path.join(dst, "onnx", "decoder_model_merged.onnx"))
    os.remove(tmp)
    print(f"{name}-onnx-community ->", dst)


def build_fp16(name):
    """<name>-fp16/: onnx/model_fp16.onnx, and PyTorch's greedy ids with the weights rounded to float16."""
    src = os.path.join(ROOT, "test", "fixtures", "torch", name)
    dst = os.path.join(ROOT, "test", "fixtures", "torch", f"{name}-fp16")
    os.makedirs(os.path.join(dst, "onnx"), exist_ok=True)
    copy_text_files(src, dst)
    fp16_min = float(torch.finfo(torch.float16).min)
    model, c, layers, kv_heads, head_dim = make_model(name, dtype_min=fp16_min)
    tmp = os.path.join(dst, "fp32.tmp.onnx")
    export_onnx(model, layers, kv_heads, head_dim, tmp)
    to_float16(tmp, os.path.join(dst, "onnx", "model_fp16.onnx"), keep_float_outputs=("logits",) if name != "gpt2" else ())
    os.remove(tmp)
    with torch.no_grad():  # the oracle: PyTorch on the weights as stored (float16), computing in float32
        for p in model.parameters():
            p.copy_(p.half().float())
    with open(os.path.join(src, "expected.json")) as f:
        base = json.load(f)
    steps = 8
    record = {"model": f"{name}-fp16", "max_positions": base["max_positions"], "max_new_tokens": steps, "prompts": [],
              "lora": {"dir": "../" + name + "/lora"}, "oracle": "PyTorch float32 on float16-rounded weights"}
    bare = [(p["text"], p["prompt_ids"]) + greedy(model, p["prompt_ids"], steps) for p in base["prompts"]]
    fifo = name == "gpt2"
    targets = base["lora"]["target_modules"]
    factors = make_lora(model, targets, fifo, base["lora"]["r"], base["lora"]["lora_alpha"], seed=7,
                        out_dir=os.path.join(dst, "lora.tmp"), base_name="")
    import shutil
    shutil.rmtree(os.path.join(dst, "lora.tmp"))
    merge_lora(factors, base["lora"]["lora_alpha"] / base["lora"]["r"], fifo)
    for (text, pids, ids_bare, m_bare) in bare:
        ids_lora, m_lora = greedy(model, pids, steps)
        record["prompts"].append({"text": text, "prompt_ids": pids, "bare": ids_bare, "lora": ids_lora,
                                  "min_margin_bare": min(m_bare), "min_margin_lora": min(m_lora)})
    # The whole context is served, but its 30-odd float16 steps are not compared (margins that long are not kept).
    record["full_context"] = {k: base["full_context"][k] for k in ("text", "prompt_ids")}
    with open(os.path.join(dst, "expected.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(f"{name}-fp16 ->", dst, "min margins", min(x["min_margin_bare"] for x in record["prompts"]),
          min(x["min_margin_lora"] for x in record["prompts"]))


# --------------------------------------------------------------------------- PEFT LoRA
def write_safetensors(path, tensors):
    """safetensors by hand: 8-byte little-endian header length, JSON header, raw little-endian data."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name].detach().cpu().numpy().astype(np.float32))
        raw = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)


def make_lora(model, targets, fan_in_fan_out, r, alpha, seed, out_dir, base_name):
    """A PEFT LoRA on every module whose name ends with a target; returns (module, A, B) to merge."""
    g = torch.Generator().manual_seed(seed)
    tensors, factors = {}, []
    for name, mod in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        w = mod.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
        a = torch.randn(r, in_f, generator=g) / math.sqrt(in_f)
        b = torch.randn(out_f, r, generator=g) * 0.5
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        factors.append((mod, a, b))
    os.makedirs(out_dir, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "r": r,
           "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": targets, "fan_in_fan_out": fan_in_fan_out,
           "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": {},
           "alpha_pattern": {}, "inference_mode": True, "init_lora_weights": True, "layers_to_transform": None}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors)
    return factors


def merge_lora(factors, scale, fan_in_fan_out):
    """PEFT's merge_and_unload: W += scale · B·A (transposed for Conv1D's [in, out] weights)."""
    with torch.no_grad():
        for mod, a, b in factors:
            delta = scale * (b @ a)
            mod.weight += delta.T if fan_in_fan_out else delta


# --------------------------------------------------------------------------- the oracle
@torch.no_grad()
def greedy(model, prompt_ids, n):
    """Full recompute, no cache: every step runs the whole sequence. Returns ids and each step's top-2 margin."""
    ids, margins = list(prompt_ids), []
    for _ in range(n):
        x = torch.tensor([ids])
        logits, _ = model(x, torch.ones_like(x), torch.arange(len(ids)).unsqueeze(0), None)
        last = logits[0, -1].float()
        top = torch.topk(last, 2).values
        margins.append(float(top[0] - top[1]))
        ids.append(int(last.argmax()))
    return ids[len(prompt_ids):], margins


PROMPTS = ["Hello, world", "The quick brown fox", "deltaserve"]
LONG_TEXTS = ["Once upon a time, in a small town by the sea, there lived a keeper of lighthouses. ",
              "All work and no play makes a dull model. ", "Lorem ipsum dolor sit amet, consectetur adipiscing elit. "]


def make_model(name, full=False, dtype_min=torch.finfo(torch.float32).min):
    """The model with its seeded weights: (model, config, layers, kv heads, head size)."""
    torch.manual_seed(0)
    if name == "gpt2":
        c = gpt2_config(full)
        model = GPT2LMHeadModel(c, dtype_min)
        layers, kv_heads, head_dim = c["n_layer"], c["n_head"], c["n_embd"] // c["n_head"]
    else:
        qwen = name == "qwen2"
        c = llama_config(qwen)
        model = LlamaForCausalLM(c, qkv_bias=qwen, tied=qwen, dtype_min=dtype_min)
        layers, kv_heads = c["num_hidden_layers"], c["num_key_value_heads"]
        head_dim = c["hidden_size"] // c["num_attention_heads"]
    init_weights(model, seed={"gpt2": 1, "llama": 2, "qwen2": 3}[name])
    model.eval()
    return model, c, layers, kv_heads, head_dim


def build(name, full=False, out_root=None):
    model, c, layers, kv_heads, head_dim = make_model(name, full)
    if name == "gpt2":
        max_pos = c["n_positions"]
        targets, fifo = ["c_attn", "c_proj", "c_fc"], True
        specials, bos, eos, add_bos = ["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", False
        template = ("{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")
    else:
        qwen = name == "qwen2"
        max_pos = c["max_position_embeddings"]
        targets, fifo = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False
        if qwen:
            specials, bos, eos, add_bos = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|endoftext|>", False
        else:
            specials, bos, eos, add_bos = ["<s>", "</s>"], "<s>", "</s>", True
        template = ("{{ bos_token }}{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}"
                    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

    out = out_root or os.path.join(ROOT, "test", "fixtures", "torch", name)
    os.makedirs(out, exist_ok=True)
    tok, tok_cfg, ids, encode = byte_tokenizer(c["vocab_size"], specials, bos, eos, add_bos, max_pos, template)
    c["bos_token_id"], c["eos_token_id"] = ids[bos], ids[eos]
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dict(c, name_or_path=f"deltaserve-fixture-{name}", transformers_version="4.36.2"), f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": ids[bos], "eos_token_id": ids[eos], "transformers_version": "4.36.2"}, f, indent=2)
    export_onnx(model, layers, kv_heads, head_dim, os.path.join(out, "model.onnx"))
    if full:
        return

    steps = 12
    r, alpha = 4, 8
    record = {"model": name, "max_positions": max_pos, "max_new_tokens": steps, "prompts": [],
              "lora": {"dir": "lora", "r": r, "lora_alpha": alpha, "target_modules": targets}}
    bare = [(p, encode(p)) + greedy(model, encode(p), steps) for p in PROMPTS]
    factors = make_lora(model, targets, fifo, r, alpha, seed=7, out_dir=os.path.join(out, "lora"),
                        base_name=f"deltaserve-fixture-{name}")
    merge_lora(factors, alpha / r, fifo)
    for (p, pids, ids_bare, m_bare) in bare:
        ids_lora, m_lora = greedy(model, pids, steps)
        record["prompts"].append({"text": p, "prompt_ids": pids, "bare": ids_bare, "lora": ids_lora,
                                  "min_margin_bare": min(m_bare), "min_margin_lora": min(m_lora)})
        if ids_bare == ids_lora:
            sys.exit(f"{name}: the LoRA does not change the greedy ids for {p!r}; pick another seed")
    # The whole context: a prompt that, with its greedy continuation, fills every position
    # (the first of a few texts whose continuation has no eos, so generation runs to the end).
    for seed_text in LONG_TEXTS:
        long_text = (seed_text * 8)[: max_pos * 3 // 4]
        long_ids = encode(long_text)
        cont = greedy(model, long_ids, max_pos - len(long_ids))[0]
        if c["eos_token_id"] not in cont:
            break
    record["full_context"] = {"text": long_text, "prompt_ids": long_ids, "lora": cont}
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(name, "->", out, "min margins",
          min(x["min_margin_bare"] for x in record["prompts"]), min(x["min_margin_lora"] for x in record["prompts"]))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", metavar="OUT_DIR", help="write GPT-2 small shapes (random weights) here, for the benchmark")
    ap.add_argument("--only", nargs="*", default=["gpt2", "llama", "qwen2"])
    a = ap.parse_args()
    if a.full:
        build("gpt2", full=True, out_root=a.full)
    else:
        for n in a.only:
            build(n)
        build_merged("qwen2")
        build_fp16("gpt2")
