"""Rules for operations that combine positions: reductions, operations along one dimension (softmax,
cumsum), pooling and resizing.

The result keeps the labels that are constant along the combined dimensions; a channel that varies
along them would be mixed with others, so it is pinned (see
:meth:`~prunekit.structure.tracer.ChannelTracer.constant_along`).
"""

from __future__ import annotations

import re

import torch

from ..calls import is_float_tensor, tensor_leaves
from ..labels import encode, ids_of, zero_ok_of
from ..ops import op_name
from ..registry import register_rule
from .elementwise import elementwise

REDUCE = {
    "sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod", "nansum", "nanmean",
    "median", "var_mean", "std_mean", "aminmax", "vector_norm",
}  # fmt: skip
ALONG_DIM = {"softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp", "softmin"}
SPATIAL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate", "upsample", "upsample_nearest",
    "upsample_bilinear", "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "fractional_max_pool2d", "grid_sample",
}  # fmt: skip
#: Reductions whose result is zero when every reduced element is (a pruned channel stays zero).
ZERO_KEEPING = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "prod", "nansum",
                "nanmean", "median", "vector_norm", "cumsum", "cumprod"}  # fmt: skip


def reduced_dims(name, args, kwargs, x) -> tuple[int, ...]:
    """The dimensions of ``x`` a reduction call combines (every one when none is given)."""
    position = 2 if name in ("norm", "vector_norm") else 1
    dim = kwargs.get("dim", args[position] if len(args) > position else None)
    if name == "norm" and len(args) > 1 and not isinstance(args[1], (int, float, str, type(None))):
        dim = args[1]
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(x.ndim))
    if isinstance(dim, int):
        return (dim % max(x.ndim, 1),)
    return tuple(d % x.ndim for d in dim)


def reduce(tracer, func, args, kwargs, out) -> None:
    """sum, mean, max, norm, ...: labels constant along the reduced dimensions survive."""
    name = op_name(func)
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
        elementwise(tracer, func, args, kwargs, out, name="maximum")  # max(a, b): elementwise
        return
    x = args[0]
    dims = reduced_dims(name, args, kwargs, x)
    kept = tracer.constant_along(tracer.full_label(x), dims)
    if name not in ZERO_KEEPING:
        kept = encode(ids_of(kept), False)
    for tensor in tensor_leaves(out):
        if not is_float_tensor(tensor):
            continue
        label = kept
        if tensor.ndim != label.ndim:
            label = label.squeeze(dims) if dims else label
        tracer.set_label(tensor, label.reshape(tuple(tensor.shape)) if label.numel() == tensor.numel() else None)


def along_dim(tracer, func, args, kwargs, out) -> None:
    """softmax, cumsum, ...: the result keeps the shape, with labels constant along ``dim``."""
    name = op_name(func)
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    dims = tuple(range(x.ndim)) if dim is None else (dim % x.ndim,)
    kept = tracer.constant_along(tracer.full_label(x), dims)
    if name not in ZERO_KEEPING:
        kept = encode(ids_of(kept), False)
    tracer.set_label(out, kept.expand(tuple(out.shape)))


def spatial(tracer, func, args, kwargs, out) -> None:
    """Pooling and resizing work per channel over the trailing spatial dimensions."""
    name = op_name(func)
    x = args[0] if args else kwargs["input"]
    match = re.search(r"(\d)d", name)
    count = int(match.group(1)) if match else x.ndim - 2
    dims = tuple(range(x.ndim - count, x.ndim))
    kept = tracer.constant_along(tracer.full_label(x), dims)
    if name == "grid_sample":  # samples outside the grid read zeros only with padding_mode="zeros"
        kept = encode(ids_of(kept), kwargs.get("padding_mode", "zeros") == "zeros" and zero_ok_of(kept))
    for tensor in tensor_leaves(out):
        if is_float_tensor(tensor):
            tracer.set_label(tensor, kept.expand(tuple(tensor.shape)))


register_rule(sorted(REDUCE), reduce)
register_rule(sorted(ALONG_DIM), along_dim)
register_rule(sorted(SPATIAL), spatial)
