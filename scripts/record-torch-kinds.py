#!/usr/bin/python3
"""Every delta kind on the real torch exports, with PyTorch as the oracle.

For each fixture of scripts/export-fixtures.py (GPT-2, Llama-GQA, Qwen2-style),
rebuilds the same PyTorch model (checked: its greedy ids equal the recorded
bare ids), and for each kind beyond PEFT's LoRA (which export-fixtures.py
records) writes a delta in its format and records PyTorch's greedy ids with the
delta's ops hooked onto the modules:

  test/fixtures/torch/<name>/kinds/<kind>/   the delta as PEFT or OpenDelta saves it
  test/fixtures/torch/<name>/kinds/expected.json
      {kind: {"dir": ..., "prompts": [{"text", "ids", "min_margin"}]}}

The kinds' math and OpenDelta's names come from scripts/record-opendelta-kinds.py
(compacter, low-rank adapter, parallel adapter); the bottleneck adapter,
BitFit and IA3 are written here as OpenDelta's and PEFT's layers compute them.
CI has no torch: the files are committed; rerun with
  /usr/bin/python3 scripts/record-torch-kinds.py
"""
import importlib.util
import json
import os
import sys

import torch

# Every greedy step of every recorded run has its best logit this far above the second:
# float reordering in the served graph (≤ 1e-4) cannot flip it.
MIN_MARGIN = 2e-3
HERE = os.path.dirname(os.path.abspath(__file__))


def load(name, file):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, file))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fx = load("export_fixtures", "export-fixtures.py")
od = load("record_opendelta_kinds", "record-opendelta-kinds.py")


def model_of(name):
    """The model export-fixtures.py exported under `name`, rebuilt the same way."""
    torch.manual_seed(0)
    if name == "gpt2":
        model = fx.GPT2LMHeadModel(fx.gpt2_config(False))
    else:
        qwen = name == "qwen2"
        model = fx.LlamaForCausalLM(fx.llama_config(qwen), qkv_bias=qwen, tied=qwen)
    fx.init_weights(model, seed={"gpt2": 1, "llama": 2, "qwen2": 3}[name])
    return model.eval()


def features(module):
    """(in, out) of an nn.Linear or GPT-2's Conv1D (weight [in, out])."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if isinstance(module, fx.Conv1D) else (w.shape[1], w.shape[0])


def adapter(params, module, in_f, out_f):
    """OpenDelta's AdapterLayer on a module's output: h + up(act(down(h))), nn.Linear pairs."""
    p = f"{module}.adapter.modulelist"
    down = od.linear(params, f"{p}.down_proj", out_f, 8, 0.5)
    up = od.linear(params, f"{p}.up_proj", 8, out_f, 0.5)
    return "output", lambda h: up(od.act("gelu_new", down(h)))


def bitfit(own_bias):
    """OpenDelta's BitFit saves the tuned bias itself (the module's own plus what training moved; a new one where it had none)."""
    def build(params, module, in_f, out_f):
        moved = torch.randn(out_f) * 0.8
        own = own_bias(module)
        params[f"{module}.bias"] = moved + (own if own is not None else 0)
        return "output", lambda h: moved
    return build


# Per family: module-name suffixes each kind targets, and IA3's feed-forward modules (PEFT's defaults for the family).
TARGETS = {
    "gpt2": {"block_out": ["c_proj"], "bitfit": ["c_attn", "c_fc"], "ia3": ["c_attn", "mlp.c_proj"], "ia3_ff": ["mlp.c_proj"]},
    "llama": {"block_out": ["o_proj", "down_proj"], "bitfit": ["q_proj", "v_proj", "up_proj"],
              "ia3": ["k_proj", "v_proj", "down_proj"], "ia3_ff": ["down_proj"]},
}


def kinds(family, own_bias):
    t = TARGETS[family]
    return {
        "adapter": (t["block_out"], {"delta_type": "adapter", "bottleneck_dim": 8, "non_linearity": "gelu_new"}, adapter),
        "bitfit": (t["bitfit"], {"delta_type": "bitfit"}, bitfit(own_bias)),
        "compacter": (t["block_out"], {"delta_type": "compacter", "reduction_factor": 4, "hypercomplex_division": 4,
                                       "non_linearity": "gelu_new", "factorized_phm": True, "factorized_phm_rule": False,
                                       "phm_rank": 1, "use_bias_down_sampler": True, "use_bias_up_sampler": True,
                                       "shared_phm_rule": False, "shared_W_phm": False},
                      od.compacter(4, True, False, "gelu_new")[1]),
        "low_rank_adapter": (t["block_out"], {"delta_type": "low_rank_adapter", "reduction_factor": 4, "non_linearity": "silu",
                                              "low_rank_rank": 1, "low_rank_w_init": "glorot-uniform"}, od.low_rank_adapter),
        "parallel_adapter": (t["block_out"], {"delta_type": "parallel_adapter", "bottleneck_dim": 6, "non_linearity": "relu",
                                              "scaled": 0.5}, od.parallel_adapter),
    }


def matches(name, suffixes):
    return any(name == s or name.endswith("." + s) for s in suffixes)


def targeted(model, suffixes):
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, fx.Conv1D)) and matches(n, suffixes)]
    assert mods, f"no module matches {suffixes}"
    return mods


def with_opendelta(model, suffixes, build, params):
    """Hooks the delta's ops onto each targeted module; returns the hook handles."""
    hooks = []
    for name, m in targeted(model, suffixes):
        reads, fn = build(params, name, *features(m))

        def hook(mod, inp, out, fn=fn, reads=reads):
            return out + fn(inp[0] if reads == "input" else out)
        hooks.append(m.register_forward_hook(hook))
    return hooks


def with_ia3(model, suffixes, ff, params, fan_in_fan_out):
    """PEFT's IA3: a feed-forward module's input times ia3_l [1, in]; any other's output times ia3_l [out, 1]."""
    hooks = []
    for name, m in targeted(model, suffixes):
        in_f, out_f = features(m)
        if matches(name, ff):
            scale = 1 + 0.8 * torch.randn(1, in_f)
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, s=scale: (inp[0] * s[0],)))
        else:
            scale = 1 + 0.8 * torch.randn(out_f, 1)
            hooks.append(m.register_forward_hook(lambda mod, inp, out, s=scale: out * s[:, 0]))
        params[f"base_model.model.{name}.ia3_l"] = scale
    config = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": suffixes, "feedforward_modules": ff,
              "fan_in_fan_out": fan_in_fan_out, "init_ia3_weights": True}
    return hooks, config


def write_delta(out, files):
    os.makedirs(out, exist_ok=True)
    for fname, content in files.items():
        if fname.endswith(".safetensors"):
            od.save_safetensors(os.path.join(out, fname), content)
        else:
            with open(os.path.join(out, fname), "w") as f:
                json.dump(content, f, indent=2, sort_keys=True)
                f.write("\n")


def record(name):
    root = os.path.join(fx.ROOT, "test", "fixtures", "torch", name)
    with open(os.path.join(root, "expected.json")) as f:
        expected = json.load(f)
    model = model_of(name)
    steps = expected["max_new_tokens"]
    for p in expected["prompts"]:
        got = fx.greedy(model, p["prompt_ids"], steps)[0]
        if got != p["bare"]:
            sys.exit(f"{name}: the rebuilt model's greedy ids differ from the export's record ({got} vs {p['bare']}); "
                     "rerun scripts/export-fixtures.py first")
    family = "gpt2" if name == "gpt2" else "llama"
    modules = dict(model.named_modules())
    own_bias = lambda module: None if modules[module].bias is None else modules[module].bias.detach().clone()
    specs = dict(kinds(family, own_bias))
    specs["ia3"] = None
    out = {}
    for index, (kind, spec) in enumerate(sorted(specs.items())):
        # The first seed whose delta changes the output and keeps every step clear of a near-tie.
        for attempt in range(50):
            params, hooks, files = {}, [], {}
            torch.manual_seed(1000 + 100 * attempt + index)
            if kind == "ia3":
                hooks, config = with_ia3(model, TARGETS[family]["ia3"], TARGETS[family]["ia3_ff"], params, family == "gpt2")
                files = {"adapter_config.json": config, "adapter_model.safetensors": params}
            else:
                suffixes, config, build = spec
                hooks = with_opendelta(model, suffixes, build, params)
                files = {"config.json": {"modified_modules": suffixes, **config}, "model.safetensors": params}
            prompts = []
            for p in expected["prompts"]:
                ids, margins = fx.greedy(model, p["prompt_ids"], steps)
                prompts.append({"text": p["text"], "ids": ids, "min_margin": min(margins)})
            for h in hooks:
                h.remove()
            changed = any(q["ids"] != p["bare"] for q, p in zip(prompts, expected["prompts"]))
            if changed and min(q["min_margin"] for q in prompts) >= MIN_MARGIN:
                break
        else:
            sys.exit(f"{name}/{kind}: no seed gave a delta that changes the ids with margins ≥ {MIN_MARGIN}")
        write_delta(os.path.join(root, "kinds", kind), files)
        out[kind] = {"dir": kind, "prompts": prompts}
        print(f"{name}/{kind}: min margin {min(q['min_margin'] for q in prompts):.4f}, "
              f"{sum(q['ids'] != p['bare'] for q, p in zip(prompts, expected['prompts']))}/{len(prompts)} prompts changed")
    with open(os.path.join(root, "kinds", "expected.json"), "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    for n in sys.argv[1:] or ["gpt2", "llama", "qwen2"]:
        record(n)
