"""Attention modules written in the Hugging Face / timm style: their head counts, as compaction reads
and updates them.

Such a module keeps its head count in an attribute (``num_heads``, ``num_attention_heads``, ...) next to
a fixed head size (``head_dim``, ``attention_head_size``, ...) and uses it in a reshape
(``q.view(b, n, self.num_heads, self.head_dim)``). :func:`prunekit.compact` recounts it from the
projections' widths (:func:`attention_head_counts`); a module with a head count it cannot recount
(:func:`head_count_is_fixed`, e.g. timm's LeViT attention, which also caches per-head biases) keeps all
its heads, so the trace never offers them for removal.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.layers import is_hf_conv1d

HEAD_DIM_ATTRIBUTES = ("head_dim", "key_value_proj_dim", "attention_head_size", "d_kv", "dim_head")
HEAD_COUNT_ATTRIBUTES = ("num_heads", "n_heads", "num_attention_heads", "n_head", "heads")
KV_HEAD_COUNT_ATTRIBUTES = ("num_key_value_heads", "n_kv_heads", "num_kv_heads")
HEADS_WIDTH_ATTRIBUTES = ("all_head_size", "inner_dim", "attn_dim")
QUERY_NAMES = ("q_proj", "q", "query", "q_lin", "to_q", "q_attn")
KEY_NAMES = ("k_proj", "k", "key", "k_lin", "to_k")


def projection_width(layer: Any) -> int | None:
    """Output width of a projection: an ``nn.Linear``, or Hugging Face's ``Conv1D`` (GPT-2), whose weight
    is stored (in, out)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if is_hf_conv1d(layer) and isinstance(getattr(layer, "weight", None), torch.Tensor):
        return layer.weight.shape[1]
    return None


def head_size(module: Any) -> int | None:
    """The size of one attention head a module stores (its first positive int attribute among
    :data:`HEAD_DIM_ATTRIBUTES`), None for a module without one."""
    for name in HEAD_DIM_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def attention_head_counts(module: nn.Module) -> tuple[int, int | None, int] | None:
    """``(query heads, key/value heads or None, head size)`` of an attention module written in the
    Hugging Face / timm style (a head-size attribute next to query/key projections, or one fused
    projection computing q, k and v), counted from its projections' current widths; None for any
    other module."""
    head_dim = head_size(module)
    if head_dim is None:
        return None
    query = next((getattr(module, n) for n in QUERY_NAMES if projection_width(getattr(module, n, None))), None)
    key = next((getattr(module, n) for n in KEY_NAMES if projection_width(getattr(module, n, None))), None)
    fused = getattr(module, "qkv", None) or getattr(module, "c_attn", None)  # timm's qkv, GPT-2's c_attn
    fused_width = projection_width(fused)
    if query is not None:
        width = projection_width(query)
    elif fused_width:
        width = fused_width // 3
    else:
        return None
    if width % head_dim:
        return None
    if key is not None:
        key_width = projection_width(key)
    elif fused_width and query is not None:
        key_width = fused_width // 2  # GPT-2 cross-attention: q_attn makes q, c_attn makes k and v
    else:
        key_width = None
    kv_heads = key_width // head_dim if key_width and key_width % head_dim == 0 else None
    return width // head_dim, kv_heads, head_dim


def head_count_is_fixed(module: Any) -> bool:
    """True when ``module`` stores a head count (an int attribute such as ``num_heads``) that
    :func:`attention_head_counts` cannot recount from its projections, so compaction could not update it."""
    if not isinstance(module, nn.Module):
        return False
    stores = any(
        isinstance(getattr(module, name, None), int) and not isinstance(getattr(module, name), bool)
        for name in HEAD_COUNT_ATTRIBUTES
    )
    return stores and attention_head_counts(module) is None
