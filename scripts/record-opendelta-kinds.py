#!/usr/bin/python3
"""
Records what OpenDelta's compacter, low-rank adapter and parallel adapter
compute, with PyTorch, as fixtures for test/deltas-kinds.test.ts:

  test/fixtures/opendelta-kinds/<kind>/config.json        OpenDelta's config, as save_finetuned writes it
  test/fixtures/opendelta-kinds/<kind>/model.safetensors  the delta's parameters under OpenDelta's names
  test/fixtures/opendelta-kinds/<kind>/io.safetensors     per module: x (its input), y (its output), out (y with the delta)

The math follows OpenDelta's layers (delta_models/compacter.py with
layers/hypercomplex_linear.py, low_rank_adapter.py with
layers/low_rank_linear.py, parallel_adapter.py), written here with PyTorch's
own operations: torch.kron for the PHM weight, broadcasting for
LowRankLinear's W_left * W_right. Modules are those of test/helpers/
backbone-info.ts's gpt2Like(1, 16). CI has no torch: the outputs are committed;
rerun with `/usr/bin/python3 scripts/record-opendelta-kinds.py`.
"""
import json
import os
import struct

import torch
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(__file__), '..', 'test', 'fixtures', 'opendelta-kinds')
HIDDEN = 16
# gpt2Like(1, 16): module → (in, out)
MODULES = {
    'transformer.h.0.attn.c_proj': (HIDDEN, HIDDEN),
    'transformer.h.0.mlp.c_proj': (4 * HIDDEN, HIDDEN),
}
ROWS = 3

def save_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().to(torch.float32).contiguous().numpy().tobytes()
        header[name] = {'dtype': 'F32', 'shape': list(t.shape), 'data_offsets': [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b' ' * (-len(head) % 8)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(head)) + head + b''.join(blobs))


def act(name, z):
    return {'gelu_new': lambda v: F.gelu(v, approximate='tanh'), 'relu': F.relu, 'gelu': F.gelu, 'silu': F.silu}[name](z)


def phm(params, prefix, n, in_f, out_f, factorized_phm, factorized_rule, scale):
    """A PHM layer: H = sum_i kron(rule_i, W_i), y = x @ H + b."""
    ki, ko = in_f // n, out_f // n
    if factorized_rule:
        left, right = torch.randn(n, n, 1), torch.randn(n, 1, n)
        params[f'{prefix}.phm_rule_left'], params[f'{prefix}.phm_rule_right'] = left, right
        rule = torch.bmm(left, right)
    else:
        rule = torch.randn(n, n, n)
        params[f'{prefix}.phm_rule'] = rule
    if factorized_phm:
        wl, wr = torch.randn(n, ki, 1), torch.randn(n, 1, ko) * scale
        params[f'{prefix}.W_left'], params[f'{prefix}.W_right'] = wl, wr
        w = torch.bmm(wl, wr)
    else:
        w = torch.randn(n, ki, ko) * scale
        params[f'{prefix}.W'] = w
    b = torch.randn(out_f) * 0.3
    params[f'{prefix}.b'] = b
    h = sum(torch.kron(rule[i], w[i]) for i in range(n))
    return lambda x: x @ h + b


def low_rank(params, prefix, in_f, out_f, scale):
    """OpenDelta's LowRankLinear at rank 1: W = W_left * W_right (broadcast), y = x @ W + b."""
    wl, wr, b = torch.randn(in_f, 1), torch.randn(1, out_f) * scale, torch.randn(out_f) * 0.3
    params[f'{prefix}.W_left'], params[f'{prefix}.W_right'], params[f'{prefix}.b'] = wl, wr, b
    return lambda x: x @ (wl * wr) + b


def linear(params, prefix, in_f, out_f, scale):
    """nn.Linear: weight [out, in]."""
    w, b = torch.randn(out_f, in_f) * scale, torch.randn(out_f) * 0.3
    params[f'{prefix}.weight'], params[f'{prefix}.bias'] = w, b
    return lambda x: x @ w.T + b


def record(folder, kind, config, build):
    """`build(params, module, in_f, out_f)` returns (reads, fn): fn(source) is what the delta adds to the module's output."""
    params, io = {}, {}
    for module, (in_f, out_f) in MODULES.items():
        reads, fn = build(params, module, in_f, out_f)
        x, y = torch.randn(ROWS, in_f), torch.randn(ROWS, out_f)
        io[f'{module}.x'], io[f'{module}.y'] = x, y
        io[f'{module}.out'] = y + fn(x if reads == 'input' else y)
    path = os.path.join(OUT, folder)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump({'delta_type': kind, 'modified_modules': ['c_proj'], **config}, f, indent=2, sort_keys=True)
        f.write('\n')
    save_safetensors(os.path.join(path, 'model.safetensors'), params)
    save_safetensors(os.path.join(path, 'io.safetensors'), io)


def compacter(n, factorized_phm, factorized_rule, activation):
    """A sequential adapter on the module's output: hidden = out_f, bottleneck = hidden / 4 (reduction_factor)."""
    def build(params, module, in_f, out_f):
        bn = out_f // 4
        p = f'{module}.compactor'
        down = phm(params, f'{p}.down_sampler', n, out_f, bn, factorized_phm, factorized_rule, 0.5)
        up = phm(params, f'{p}.up_sampler', n, bn, out_f, factorized_phm, factorized_rule, 0.5)
        return 'output', lambda h: up(act(activation, down(h)))
    config = {
        'reduction_factor': 4, 'hypercomplex_division': n, 'non_linearity': activation, 'factorized_phm': factorized_phm,
        'factorized_phm_rule': factorized_rule, 'phm_rank': 1, 'use_bias_down_sampler': True, 'use_bias_up_sampler': True,
        'shared_phm_rule': False, 'shared_W_phm': False, 'kronecker_prod': None,
    }
    return config, build


def low_rank_adapter(params, module, in_f, out_f):
    bn = out_f // 4
    p = f'{module}.low_rank_adapter'
    down = low_rank(params, f'{p}.down_sampler', out_f, bn, 0.5)
    up = low_rank(params, f'{p}.up_sampler', bn, out_f, 0.5)
    return 'output', lambda h: up(act('silu', down(h)))


def parallel_adapter(params, module, in_f, out_f):
    p = f'{module}.parallel_adapter.modulelist'
    down = linear(params, f'{p}.down_proj', in_f, 6, 0.4)
    up = linear(params, f'{p}.up_proj', 6, out_f, 0.4)
    return 'input', lambda x: 0.5 * up(act('relu', down(x)))


if __name__ == '__main__':
    torch.manual_seed(20261201)
    record('compacter', 'compacter', *compacter(4, True, False, 'gelu_new'))
    record('compacter-full-weight', 'compacter', *compacter(2, False, True, 'gelu'))
    record('low_rank_adapter', 'low_rank_adapter',
           {'reduction_factor': 4, 'non_linearity': 'silu', 'low_rank_rank': 1, 'low_rank_w_init': 'glorot-uniform'}, low_rank_adapter)
    record('parallel_adapter', 'parallel_adapter', {'bottleneck_dim': 6, 'non_linearity': 'relu', 'scaled': 0.5}, parallel_adapter)
    print(f'wrote {sorted(os.listdir(OUT))} under {os.path.normpath(OUT)}')
