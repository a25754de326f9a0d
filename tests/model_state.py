"""Helpers for the reliability tests: small models, and a bit-for-bit snapshot of everything a
refused call must leave alone (state_dict, every buffer, hooks, requires_grad, parametrizations,
training flags)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def make_convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


X = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
IMAGES = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))


def _bits(tensor):
    """A tensor's bytes (NaN patterns included), for bit-for-bit comparison of any dtype (meta
    tensors have no bytes; quantized ones are compared through their integer representation)."""
    if tensor.device.type == "meta":
        return torch.empty(0, dtype=torch.uint8)
    if tensor.is_quantized:
        tensor = tensor.int_repr()
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.bool else flat


def snapshot(model):
    """Everything a failed call must leave alone."""
    hooks = []
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks.append((name, kind, tuple(getattr(module, kind).values())))
    return {
        "state": {
            k: (v.dtype, tuple(v.shape), _bits(v).clone()) if isinstance(v, torch.Tensor) else (repr(v), None, None)
            for k, v in model.state_dict().items()
        },
        "buffers": {k: _bits(v).clone() for k, v in model.named_buffers()},
        "hooks": hooks,
        "param_hooks": [(n, len(p._backward_hooks or {}), len(p._post_accumulate_grad_hooks or {})) for n, p in
                        model.named_parameters()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "parametrized": [n for n, m in model.named_modules() if parametrize.is_parametrized(m)],
        "training": [m.training for m in model.modules()],
    }  # fmt: skip


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, (dtype, shape, bits) in before["state"].items():
        assert after["state"][key][:2] == (dtype, shape), key
        assert bits is None or torch.equal(after["state"][key][2], bits), key
    assert after["buffers"].keys() == before["buffers"].keys()  # no mask buffer added
    for key, bits in before["buffers"].items():
        assert torch.equal(after["buffers"][key], bits), key
    for key in ("hooks", "param_hooks", "requires_grad", "parametrized", "training"):
        assert after[key] == before[key], key


def expect_refusal(model, call, exc, match):
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        call()
    assert_unchanged(model, before)


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)
