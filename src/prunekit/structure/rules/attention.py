"""Rules for products: matrix products, einsum, scaled dot-product attention and nn.MultiheadAttention.

A product with a layer's weight (``x @ W`` as in GPT-2's Conv1D) consumes and produces channels like a
Linear. A product of two activations (:func:`prunekit.structure.products.is_activation_product`) couples
everything within one slice of its leading (batch, head) dimensions: the unit is the attention head,
recorded in ``tracer.heads`` so that ``prune_only="heads"`` can tell heads from channels.
"""

from __future__ import annotations

import math

import torch

from ..calls import bind, is_float_tensor, signature, tensor_leaves
from ..labels import encode, ids_of, unbroadcast, zero_ok_of
from ..ops import op_name
from ..products import einsum_operands, is_activation_product, matrix_operands
from ..registry import register_rule
from ..tracer import UnsupportedOperationError


def _is_layer_weight(tracer):
    return lambda tensor: tracer.owner(tensor) is not None and tensor.ndim == 2


def matmul(tracer, func, args, kwargs, out) -> None:
    """matmul / mm / bmm / ``@`` / addmm / baddbmm: a product with a 2-D weight of the model is a layer,
    a product of activations couples heads."""
    name = op_name(func)
    a, b, bias = matrix_operands(name, args, kwargs)
    if is_activation_product(name, args, kwargs, _is_layer_weight(tracer)):
        batched_product(tracer, a, b, out, extra=(bias,))
    elif tracer.owner(b) is not None and b.ndim == 2:  # x @ W with W stored (in, out), as GPT-2's Conv1D
        tracer.consume(tracer.label(a), -1, tracer.param_ids(b, 0, consumer=True))
        out_ids = tracer.param_ids(b, 1, producer=True)
        tracer.join_param(bias, 0, out_ids)
        tracer.set_label(out, tracer.produce(tuple(out.shape), -1, out_ids), has_channels=True)
    else:  # W @ x
        tracer.consume(tracer.label(b), -2 if b.ndim > 1 else 0, tracer.param_ids(a, 1, consumer=True))
        out_ids = tracer.param_ids(a, 0, producer=True)
        tracer.set_label(out, tracer.produce(tuple(out.shape), -2 if out.ndim > 1 else 0, out_ids))


def batched_product(tracer, a, b, out, extra=()) -> None:
    """Two activations multiplied (attention scores, attention-weighted values): everything within one
    slice of the leading (batch, head) dimensions is coupled, so the unit is the head.

    Multi-query attention (Shazeer 2019, "Fast Transformer Decoding: One Write-Head is All You Need"):
    when one factor carries the same channels in every head of a 4-D product (the single key/value head,
    repeated for every query head), that factor is kept whole and each query head is a unit of its own
    (see :func:`shared_by_every_head`)."""
    lead = tuple(out.shape[:-2]) if out.ndim > 2 else ()
    slices = math.prod(lead)
    operands = [t for t in (a, b) if isinstance(t, torch.Tensor)]
    shared = [t for t in operands if len(lead) == 2 and shared_by_every_head(tracer.full_label(t), lead)]
    single_kv = len(operands) == 2 and len(shared) == 1
    if single_kv:
        tracer.pin_tensors(shared[0])
    rows = []
    for tensor in (a, b, *extra):
        if not isinstance(tensor, torch.Tensor) or (single_kv and tensor is shared[0]):
            continue
        label = tracer.full_label(tensor)
        if label.ndim > 2:
            rows.append(label.expand(*lead, *label.shape[-2:]).reshape(slices, -1))
        else:
            rows.append(label.reshape(1, -1).expand(slices, -1))
    ids = ids_of(torch.cat(rows, dim=1))
    first = ids.amax(dim=1, keepdim=True)
    tracer.graph.join(first.expand_as(ids), ids)
    tracer.heads.append(first[:, 0])
    if single_kv:
        # A pruned query head reads the kept keys and values: its scores are zero, its output (a uniform
        # average of the values) is not; it is exact only with the columns that read it, see read_out_heads.
        zero_ok = zero_ok_of(rows[0]).all(dim=1)
        tracer.read_out_heads.append(first[:, 0])
    else:
        # Zero where a pruned head zeroes either factor (attention weights × the head's pruned values).
        zero_ok = zero_ok_of(rows[0]).all(dim=1) | zero_ok_of(rows[-1]).all(dim=1)
    label = encode(first[:, 0], zero_ok)
    shape = (*lead, 1, 1)[: out.ndim] if out.ndim >= 2 else [1] * out.ndim
    tracer.set_label(out, label.reshape(shape).expand(tuple(out.shape)))


def shared_by_every_head(label: torch.Tensor, lead: tuple[int, ...]) -> bool:
    """Whether the labels of a (batch, heads, rows, columns) factor hold some channel and are the same in
    every one of several heads (dimension 1 of ``lead``): one key/value head read by every query head."""
    if len(lead) != 2 or lead[1] < 2 or label.ndim != 4:
        return False
    label = label.expand(*lead, *label.shape[-2:])
    if label.stride(1) == 0:  # broadcast over the heads (a single head expanded): the same by construction
        return bool((unbroadcast(label) >= 0).any())
    per_head = ids_of(label).reshape(lead[0], lead[1], -1)
    return bool((per_head >= 0).any()) and bool((per_head == per_head[:, :1]).all())


def scaled_dot_product_attention(tracer, func, args, kwargs, out) -> None:
    """One unit per key/value head with the query heads that share it (grouped-query attention): its
    query/key/value channels and any additive mask of that head. With a single key/value head read by
    every query head (multi-query attention: one key/value head given, or repeated for every query head)
    the keys and values are kept whole and each query head is a unit (see :func:`batched_product`)."""
    q, k, v, mask = bind(args, kwargs, ("query", "key", "value", "attn_mask"))
    heads, kv_heads = q.shape[-3], k.shape[-3]
    lead = tuple(q.shape[:-3])
    batch = math.prod(lead) if lead else 1

    def per_head(tensor, count):
        label = tracer.full_label(tensor)
        label = label.expand(*lead, count, *label.shape[-2:]) if label.ndim == len(lead) + 3 else label
        return label.reshape(batch, count, -1).transpose(0, 1).reshape(count, -1)

    k_rows, v_rows = per_head(k, kv_heads), per_head(v, kv_heads)
    single_kv = (
        heads > 1
        and bool((ids_of(k_rows) >= 0).any())
        and all(bool((ids_of(rows) == ids_of(rows[:1])).all()) for rows in (k_rows, v_rows))
    )
    if single_kv:
        tracer.graph.pin(ids_of(torch.cat([k_rows[:1], v_rows[:1]], dim=1)))
        kv_heads = heads  # every query head on its own
    group = heads // kv_heads
    q_rows = per_head(q, heads).reshape(kv_heads, -1)
    rows = [q_rows] if single_kv else [q_rows, k_rows, v_rows]
    if isinstance(mask, torch.Tensor) and is_float_tensor(mask) and tracer.label(mask) is not None:
        full = tracer.full_label(mask).expand(*lead, heads, q.shape[-2], k.shape[-2])
        rows.append(full.reshape(batch, heads, -1).transpose(0, 1).reshape(kv_heads, -1))
    ids = ids_of(torch.cat(rows, dim=1))
    first = ids.amax(dim=1, keepdim=True).expand_as(ids)
    tracer.graph.join(first, ids)
    tracer.heads.append(first[:, 0])
    if single_kv:
        # A pruned query head's output is the uniform average of the kept values, not zero: it is exact
        # only with the columns that read it (see ChannelTracer.read_out_heads).
        zero_ok = torch.zeros(heads, dtype=torch.bool)
        tracer.read_out_heads.append(first[:, 0])
    else:
        zero_ok = zero_ok_of(v_rows).all(dim=1)
    head_label = encode(first[:, 0], zero_ok).repeat_interleave(group)
    tracer.set_label(out, head_label.reshape(heads, 1, 1).expand(tuple(out.shape)))


def multi_head_attention(tracer, func, args, kwargs, out) -> None:
    """nn.MultiheadAttention (torch's functional form, or prunekit's for an already pruned one): one unit
    per head, made of that head's rows of the query, key and value projections (and their biases and
    bias_k/bias_v) and its columns of out_proj. The input widths are consumed by the projections'
    columns and the output width is produced by out_proj's rows, as for Linear layers."""
    call = signature(func).bind(*args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    separate = bool(a["use_separate_proj_weight"])
    projections = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]] if separate else [a["in_proj_weight"]]
    out_weight, heads = a["out_proj_weight"], int(a["num_heads"])
    attention, weights = (tuple(out) + (None,))[:2] if isinstance(out, (tuple, list)) else (out, None)
    opaque = any(tracer.owner(t) is None for t in (*projections, out_weight)) or any(
        a.get(name) is not None for name in ("static_k", "static_v")
    )
    if opaque:  # computed projection weights or caller-supplied keys: the module stays whole
        tracer.pin_tensors(*tensor_leaves((args, kwargs)))
        tracer.pin_outputs(out)
        return
    # Masks are plain data to the heads: a mask computed from channels keeps those channels.
    tracer.pin_tensors(a["attn_mask"], a["key_padding_mask"])
    inputs = (a["query"], a["key"], a["value"])
    if separate:
        for x, weight in zip(inputs, projections):
            tracer.consume(tracer.label(x), -1, tracer.param_ids(weight, 1, consumer=True))
        rows = [tracer.param_ids(weight, 0, producer=True).reshape(heads, -1) for weight in projections]
    else:
        columns = tracer.param_ids(projections[0], 1, consumer=True)
        for x in inputs:
            tracer.consume(tracer.label(x), -1, columns)
        packed = tracer.param_ids(projections[0], 0, producer=True).reshape(3, heads, -1)
        rows = [packed.transpose(0, 1).reshape(heads, -1)]
    if a["in_proj_bias"] is not None and tracer.owner(a["in_proj_bias"]) is not None:
        rows.append(tracer.param_ids(a["in_proj_bias"], 0).reshape(3, heads, -1).transpose(0, 1).reshape(heads, -1))
    for name in ("bias_k", "bias_v"):
        if a[name] is not None and tracer.owner(a[name]) is not None:
            rows.append(tracer.param_ids(a[name], -1).reshape(heads, -1))
    rows.append(tracer.param_ids(out_weight, 1, consumer=True).reshape(heads, -1))
    ids = torch.cat(rows, dim=1)
    tracer.graph.join(ids[:, :1].expand_as(ids), ids)
    head_ids = ids[:, 0]
    tracer.heads.append(head_ids)
    mask = a["attn_mask"]
    if isinstance(mask, torch.Tensor) and mask.dim() == 3 and heads > 1:
        # One mask per (batch, head) pair: the caller's mask fixes the head count.
        tracer.graph.pin(head_ids)
    out_ids = tracer.param_ids(out_weight, 0, producer=True)
    tracer.join_param(a["out_proj_bias"], 0, out_ids)
    tracer.set_label(attention, tracer.produce(tuple(attention.shape), -1, out_ids))
    if not is_float_tensor(weights):
        return
    if not a["average_attn_weights"]:  # (N, heads, L, S): a head's weights go with the head
        tracer.set_label(weights, tracer.produce(tuple(weights.shape), -3, head_ids, zero_ok=False))
        return
    # Weights averaged over the heads change when any head goes: if anything reads them (or the model
    # returns them) the heads must stay. Labelled with the head ids in turn so that a model output
    # pins them; any operation that reads them pins them too (see ChannelTracer._apply_rule).
    if weights.numel() < heads:
        tracer.graph.pin(head_ids)
    cycled = head_ids.repeat(weights.numel() // heads + 1)[: weights.numel()]
    tracer.set_label(weights, encode(cycled, False).reshape(tuple(weights.shape)))
    tracer.head_mixtures[weights] = head_ids


def einsum(tracer, func, args, kwargs, out) -> None:
    """Activations multiplied by einsum: like a batched matmul, everything within one slice of the
    indices kept by every operand and the output (batch, heads) is coupled."""
    equation, operands = einsum_operands(args)
    equation = equation.replace(" ", "")
    if (
        "..." in equation
        or "->" not in equation
        or not is_activation_product("einsum", args, kwargs, lambda t: tracer.owner(t) is not None)
    ):
        where = tracer.where
        raise UnsupportedOperationError(
            f"prunekit follows einsum only between activations with an explicit '->' and no '...', got "
            f"{args[0]!r} in module {where!r}; {tracer.advice(where, 'einsum')}"
        )
    terms, result = equation.split("->")
    terms = terms.split(",")
    batch = [c for c in result if all(c in term for term in terms)]
    sizes = {c: out.shape[result.index(c)] for c in batch}
    slices = math.prod(sizes.values())
    rows = []
    for term, tensor in zip(terms, operands):
        label = tracer.full_label(tensor)
        order = [term.index(c) for c in batch] + [i for i, c in enumerate(term) if c not in batch]
        label = label.permute(order)
        rows.append(label.expand(*[sizes[c] for c in batch], *label.shape[len(batch) :]).reshape(slices, -1))
    ids = ids_of(torch.cat(rows, dim=1))
    first = ids.amax(dim=1, keepdim=True)
    tracer.graph.join(first.expand_as(ids), ids)
    tracer.heads.append(first[:, 0])
    zero_ok = torch.stack([zero_ok_of(row).all(dim=1) for row in rows]).any(dim=0)
    label = encode(first[:, 0], zero_ok).reshape([sizes[c] for c in batch])
    shape = [out.shape[i] if c in sizes else 1 for i, c in enumerate(result)]
    order = sorted(range(len(batch)), key=lambda i: result.index(batch[i]))
    label = label.permute(order).reshape(shape) if batch else label.reshape(shape)
    tracer.set_label(out, label.expand(tuple(out.shape)))


register_rule(["matmul", "mm", "bmm", "rmatmul", "addmm", "baddbmm", "addbmm"], matmul)
register_rule("scaled_dot_product_attention", scaled_dot_product_attention)
register_rule(["multi_head_attention_forward", "pruned_multi_head_attention_forward"], multi_head_attention)
register_rule("einsum", einsum)
