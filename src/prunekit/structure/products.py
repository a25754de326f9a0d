"""Which calls multiply two activations (attention scores q·kᵀ, attention-weighted values), as opposed to
applying a layer's weight.

The tracer and :func:`prunekit.summary` both ask: the tracer couples everything within one slice of an
activation × activation product into one unit (an attention head), and the summary counts such products
in rows of their own. Both use :func:`is_activation_product`, each with its own test of what a weight is
(the tracer: a 2-D parameter or buffer of the model; the summary: a parameter or a view of one's memory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .calls import bind

#: Matrix products by canonical operation name (see :func:`prunekit.structure.ops.op_name`).
MATRIX_PRODUCTS = frozenset({"matmul", "mm", "bmm", "rmatmul", "addmm", "baddbmm", "addbmm"})
#: Attention operations: their products are always between activations.
ATTENTION = frozenset(
    {"scaled_dot_product_attention", "multi_head_attention_forward", "pruned_multi_head_attention_forward"}
)


def matrix_operands(name: str, args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    """``(left, right, added)`` of a matrix product call: ``left @ right`` (+ ``added`` for addmm /
    baddbmm / addbmm, else None); ``x.__rmatmul__(y)`` is ``y @ x``."""
    if name == "rmatmul":
        return args[1], args[0], None
    if name in ("addmm", "baddbmm", "addbmm"):
        added, left, right = bind(args, kwargs, ("input", "mat1", "mat2"))[:3]
        if left is None:  # baddbmm / addbmm name them batch1, batch2
            left, right = kwargs.get("batch1"), kwargs.get("batch2")
        return left, right, added
    left, right = bind(args, kwargs, ("input", "other"))
    return left, right if right is not None else kwargs.get("mat2"), None


def einsum_operands(args: tuple) -> tuple[Any, list[Any]]:
    """``(equation, operands)`` of an einsum call (operands given one by one or as one list)."""
    equation = args[0]
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    return equation, operands


def is_activation_product(name: str, args: tuple, kwargs: dict, is_weight: Callable[[torch.Tensor], bool]) -> bool:
    """True when the call ``name(*args, **kwargs)`` multiplies activations only: attention, or a matrix
    product / einsum none of whose factors ``is_weight``."""
    if name in ATTENTION:
        return True
    if name in MATRIX_PRODUCTS:
        factors = matrix_operands(name, args, kwargs)[:2]
    elif name == "einsum":
        factors = einsum_operands(args)[1]
    else:
        return False
    return all(isinstance(t, torch.Tensor) and not is_weight(t) for t in factors)
