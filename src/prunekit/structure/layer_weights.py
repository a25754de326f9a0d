"""Which weights a layer applies at each position of its input: what MAC counts multiply.

Used by :mod:`prunekit.summary` (MACs per layer) and :mod:`.cost` (MACs kept by structured pruning);
it lives here, below both, so that the structure package never imports the summary.
"""

from __future__ import annotations

import torch
from torch import nn

from ..targets import is_hf_conv1d

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def counts_weight_macs(module: nn.Module) -> bool:
    """A Linear, Conv, ConvTranspose or Hugging Face ``Conv1D`` (GPT-2's linear layer, weight stored
    (in, out)): a layer whose weight elements each cost one MAC per position it is applied at."""
    weight = getattr(module, "weight", None)
    hf_conv1d = is_hf_conv1d(module) and isinstance(weight, torch.Tensor) and weight.ndim == 2
    return isinstance(module, (nn.Linear, *CONV, *CONV_TRANSPOSE)) or hf_conv1d


def applied_weights(module: nn.Module) -> list[torch.Tensor]:
    """The weights whose MACs a module's applications count: its ``weight``, or for an
    ``nn.MultiheadAttention`` its query/key/value projection weights (``out_proj`` is a Linear of its own)."""
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        return [w for w in (getattr(module, n, None) for n in names) if isinstance(w, torch.Tensor)]
    weight = getattr(module, "weight", None)
    return [weight] if counts_weight_macs(module) and isinstance(weight, torch.Tensor) else []
