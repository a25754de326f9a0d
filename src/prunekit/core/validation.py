"""Checks shared by the entry points, each raising before anything changes."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .targets import Target


def check_whole(value: object, what: str, unit: str, minimum: int = 0) -> int:
    """``value`` if it is a whole number ≥ ``minimum``; else ``ValueError`` naming ``what`` and its unit."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be a whole number of {unit} ≥ {minimum}, got {value!r}")
    return value


def check_finite(targets: Iterable[Target], tensors: Iterable[tuple[nn.Module, str, str]] = ()) -> None:
    """Refuse NaN or inf in any weight pruning scores or any tensor it masks (biases and norm
    parameters masked with their channels): a NaN at a pruned entry would stay NaN under masking."""
    seen = set()
    named = [(t.full_name, t.param, f"layer {t.name!r} has NaN or inf weights") for t in targets]
    named += [
        (full, getattr(m, p), f"{full!r} (masked with its channels) has NaN or inf values") for m, p, full in tensors
    ]
    for name, tensor, problem in named:
        if name in seen or not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        seen.add(name)
        if tensor.device.type == "meta":
            raise ValueError(
                f"{name} is on the meta device (no values to score); load or materialise the weights "
                "(e.g. model.to_empty(device='cpu') and load a state dict) before pruning"
            )
        values = tensor.detach()
        # A sum is a cheap test; only when it is not finite is the exact (slower) test needed.
        if not math.isfinite(float(values.sum())) and not bool(torch.isfinite(values).all()):
            raise ValueError(f"{problem}; fix the model (or exclude that layer) before pruning")
