"""Perplexity of a causal language model over non-overlapping windows, as SparseGPT and Wanda evaluate
WikiText-2: the token stream is cut into ⌊N / window⌋ windows of ``window`` tokens (the remainder is
dropped), each window is scored on its own, and

    perplexity = exp( Σ_windows Σ_t −log p(x_t | x_<t) / number of predicted tokens ),

where the first token of each window is context only (window − 1 predictions per window).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot read logits from a model output of type {type(output).__name__}")


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, window: int = 512, batch_size: int = 1) -> float:
    """Perplexity of ``model`` on ``token_ids`` (a 1-D tensor, or (1, N)) over non-overlapping windows of
    ``window`` tokens, ``batch_size`` windows per forward pass.

    The model takes a (batch, window) tensor of token ids and returns logits (batch, window, vocab),
    directly or as ``.logits`` or the first entry of a tuple (Hugging Face models do). It is run in eval
    mode and its train/eval flags are restored afterwards.
    """
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("token_ids must be an integer tensor of token ids")
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D (one token stream), got shape {tuple(token_ids.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be a whole number of tokens ≥ 2, got {window!r}")
    count = token_ids.numel() // window
    if count == 0:
        raise ValueError(f"token_ids has {token_ids.numel()} tokens, fewer than one window of {window}")
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    windows = token_ids[: count * window].long().view(count, window)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    total = 0.0
    try:
        for start in range(0, count, batch_size):
            ids = windows[start : start + batch_size].to(device)
            logits = _logits(model(ids))[:, :-1].float()
            total += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            )
    finally:
        for module, mode in modes.items():
            module.training = mode
    return math.exp(total / (count * (window - 1)))
