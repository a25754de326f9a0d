"""``torch.nn.MultiheadAttention`` with fewer heads than its model width allows.

``nn.MultiheadAttention`` ties two widths together: ``embed_dim`` is both the width of the tokens it
reads and writes (the residual stream) and the width of its query, key and value projections, which
must be ``num_heads × head_dim``. Removing heads breaks that equality, so a compacted attention
module whose heads were pruned becomes a :class:`PrunedMultiheadAttention`: the same module (same
parameters, buffers, hooks and state-dict keys), whose forward accepts an inner width of
``num_heads × head_dim`` that differs from ``embed_dim``.

:func:`pruned_multi_head_attention_forward` is its functional form. It dispatches through
``__torch_function__``, so prunekit's channel tracer sees it as one operation (like
``torch.nn.functional.multi_head_attention_forward``) and a pruned model can be pruned again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function

from .core.layers import handler_for_type, register_layer


def pruned_multi_head_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    in_proj_weight: torch.Tensor | None,
    in_proj_bias: torch.Tensor | None,
    bias_k: torch.Tensor | None,
    bias_v: torch.Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    training: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: torch.Tensor | None = None,
    k_proj_weight: torch.Tensor | None = None,
    v_proj_weight: torch.Tensor | None = None,
    average_attn_weights: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``torch.nn.functional.multi_head_attention_forward`` without the requirement that the query,
    key and value width equal the input width: the head size is the query projection's width divided
    by ``num_heads``. Inputs are sequence-first, ``(L, N, E)``, or unbatched ``(L, E)``; returns the
    attention output and, with ``need_weights``, the attention weights (averaged over heads with
    ``average_attn_weights``), as torch's function does."""
    arguments = (
        query, key, value, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p,
        out_proj_weight, out_proj_bias, training, key_padding_mask, need_weights, attn_mask,
        use_separate_proj_weight, q_proj_weight, k_proj_weight, v_proj_weight, average_attn_weights,
    )  # fmt: skip
    tensors = tuple(a for a in arguments if isinstance(a, torch.Tensor))
    if has_torch_function(tensors):
        return handle_torch_function(pruned_multi_head_attention_forward, tensors, *arguments)

    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    target_len, batch = query.shape[0], query.shape[1]

    if use_separate_proj_weight:
        if q_proj_weight is None or k_proj_weight is None or v_proj_weight is None:
            raise ValueError("use_separate_proj_weight=True needs q_proj_weight, k_proj_weight and v_proj_weight")
        weights_qkv = (q_proj_weight, k_proj_weight, v_proj_weight)
    else:
        if in_proj_weight is None:
            raise ValueError("in_proj_weight is None: pass use_separate_proj_weight=True with q/k/v_proj_weight")
        weights_qkv = in_proj_weight.chunk(3)
    biases_qkv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q = F.linear(query, weights_qkv[0], biases_qkv[0])
    k = F.linear(key, weights_qkv[1], biases_qkv[1])
    v = F.linear(value, weights_qkv[2], biases_qkv[2])
    inner = q.shape[-1]
    if inner % num_heads:
        raise ValueError(f"the query width {inner} is not a multiple of num_heads={num_heads}")
    head_dim = inner // num_heads

    attn_mask = _additive_mask(attn_mask, q.dtype, "attn_mask")
    key_padding_mask = _additive_mask(key_padding_mask, q.dtype, "key_padding_mask")
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, batch, 1)])
        v = torch.cat([v, bias_v.repeat(1, batch, 1)])
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None

    # (length, batch, heads × head_dim) -> (batch × heads, length, head_dim), torch's layout.
    q = q.reshape(target_len, batch * num_heads, head_dim).transpose(0, 1)
    k = k.reshape(k.shape[0], batch * num_heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], batch * num_heads, head_dim).transpose(0, 1)
    if add_zero_attn:
        zeros = k.new_zeros((batch * num_heads, 1, head_dim))
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    source_len = k.shape[1]

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() != 3 or attn_mask.shape[0] != batch * num_heads:
            raise ValueError(
                f"attn_mask must have shape ({target_len}, {source_len}) or ({batch * num_heads}, {target_len}, "
                f"{source_len}) (batch × the {num_heads} heads this module has now), got {tuple(attn_mask.shape)}"
            )
    if key_padding_mask is not None:
        per_head = key_padding_mask.reshape(batch, 1, 1, source_len).expand(-1, num_heads, -1, -1)
        per_head = per_head.reshape(batch * num_heads, 1, source_len)
        attn_mask = per_head if attn_mask is None else attn_mask + per_head
    if not training:
        dropout_p = 0.0

    weights = None
    if need_weights:
        scaled = q * head_dim**-0.5
        if attn_mask is not None:
            scores = torch.baddbmm(attn_mask, scaled, k.transpose(-2, -1))
        else:
            scores = torch.bmm(scaled, k.transpose(-2, -1))
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        output = torch.bmm(weights, v).transpose(0, 1).reshape(target_len * batch, inner)
        weights = weights.reshape(batch, num_heads, target_len, source_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
    else:
        if attn_mask is not None:
            attn_mask = (
                attn_mask.unsqueeze(0)
                if attn_mask.shape[0] == 1
                else attn_mask.reshape(batch, num_heads, -1, source_len)
            )
        per_head = [t.reshape(batch, num_heads, -1, head_dim) for t in (q, k, v)]
        output = F.scaled_dot_product_attention(*per_head, attn_mask=attn_mask, dropout_p=dropout_p)
        output = output.permute(2, 0, 1, 3).reshape(target_len * batch, inner)
    output = F.linear(output, out_proj_weight, out_proj_bias).reshape(target_len, batch, -1)
    if not batched:
        output = output.squeeze(1)
    return output, weights


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype, name: str) -> torch.Tensor | None:
    """A boolean mask (True = may not attend) as an additive float mask, as torch's attention does."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be a bool or floating point tensor, got {mask.dtype}")
    return mask.to(dtype)


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` that lost heads (or input width) to compaction.

    Its parameters keep their names; ``in_proj_weight`` (or ``q/k/v_proj_weight``) has
    ``num_heads × head_dim`` rows per projection, which may differ from ``embed_dim``, the width of
    the inputs it reads. ``forward`` has ``nn.MultiheadAttention``'s signature and semantics
    (``batch_first``, masks, ``need_weights``, ``average_attn_weights``, dropout in training mode).
    Instances are made by :func:`shrink_multihead_attention`, never built directly.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError(
            "PrunedMultiheadAttention is made from a compacted nn.MultiheadAttention (prunekit.compact or "
            "prunekit.load_pruned); build an nn.MultiheadAttention instead"
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            # As nn.MultiheadAttention: is_causal is only a hint that attn_mask is the causal mask.
            raise RuntimeError("is_causal=True needs attn_mask (the causal mask itself) in MultiheadAttention")
        swap = self.batch_first and query.dim() == 3
        if swap:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        output, weights = pruned_multi_head_attention_forward(
            query, key, value, self.num_heads, self.in_proj_weight, self.in_proj_bias, self.bias_k, self.bias_v,
            self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias, self.training,
            key_padding_mask, need_weights, attn_mask, self.in_proj_weight is None, self.q_proj_weight,
            self.k_proj_weight, self.v_proj_weight, average_attn_weights,
        )  # fmt: skip
        return (output.transpose(0, 1) if swap else output), weights


def shrink_multihead_attention(module: nn.MultiheadAttention) -> None:
    """Make an ``nn.MultiheadAttention`` whose tensors were sliced agree with them: recount its heads
    (whole heads were removed, so ``head_dim`` stays), take its input widths from the projections and,
    when they no longer fit ``nn.MultiheadAttention``'s rules, turn it into a
    :class:`PrunedMultiheadAttention` (in place: the same object, parameters and hooks)."""
    packed = module.in_proj_weight is not None
    if packed:
        inner, embed_dim = module.in_proj_weight.shape[0] // 3, module.in_proj_weight.shape[1]
        kdim = vdim = embed_dim
    else:
        inner, embed_dim = module.q_proj_weight.shape
        kdim, vdim = module.k_proj_weight.shape[1], module.v_proj_weight.shape[1]
    unchanged = (module.embed_dim, module.kdim, module.vdim, module.num_heads * module.head_dim) == (
        embed_dim, kdim, vdim, inner,
    )  # fmt: skip
    if unchanged:
        return
    if inner % module.head_dim:
        raise ValueError(
            f"the query projection of {type(module).__name__} has {inner} rows, not whole heads of "
            f"{module.head_dim}: it was sliced by a plan that does not come from prunekit.compact"
        )
    module.num_heads = inner // module.head_dim
    module.embed_dim, module.kdim, module.vdim = embed_dim, kdim, vdim
    # torch's fused fast paths (nn.TransformerEncoderLayer in eval mode) assume embed_dim = heads ×
    # head_dim; this flag is one they check before taking them. The forward below does not read it.
    module._qkv_same_embed_dim = False
    module.__class__ = PrunedMultiheadAttention


# Compaction asks the layer registry how a sliced nn.MultiheadAttention updates itself.
register_layer(
    nn.MultiheadAttention, handler_for_type(nn.MultiheadAttention).with_options(update_shape=shrink_multihead_attention)
)
