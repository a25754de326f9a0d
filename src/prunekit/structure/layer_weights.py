"""Which weights a layer applies at each position of its input: what MAC counts multiply.

Used by :mod:`prunekit.summary` (MACs per layer) and :mod:`.cost` (MACs kept by structured pruning),
from the layer registry (:mod:`prunekit.core.layers`), so that a registered layer type is counted too;
it lives here, below both, so that the structure package never imports the summary.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.layers import handler_for


def counts_weight_macs(module: nn.Module) -> bool:
    """A layer whose weight elements each cost one MAC per position it is applied at: Linear, Conv,
    ConvTranspose, Hugging Face ``Conv1D`` and any registered layer type that counts MACs."""
    handler = handler_for(module)
    return handler is not None and handler.counts_macs and bool(handler.prunable_weights(module))


def applied_weights(module: nn.Module) -> list[torch.Tensor]:
    """The weights whose MACs a module's applications count: its handler's weights, or for an
    ``nn.MultiheadAttention`` its query/key/value projection weights (``out_proj`` is a Linear of its own)."""
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        return [w for w in (getattr(module, n, None) for n in names) if isinstance(w, torch.Tensor)]
    return handler_for(module).applied_weights(module) if counts_weight_macs(module) else []


def applications(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    """How many times one call of ``module`` applied its weights (positions)."""
    handler = handler_for(module)
    return handler.positions(module, inputs, output, handler.output_channel_dim)


def linear_like(module: nn.Module) -> bool:
    """Its weights are applied once per token (output channels on the last dimension), so with no
    example inputs one application is a fair count; convolutions need inputs to know their positions."""
    handler = handler_for(module)
    return handler is not None and handler.output_channel_dim == -1
