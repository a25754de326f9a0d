"""Rules for operations that only move data: view, reshape, permute, cat, split, flatten, indexing,
expand, pixel shuffle, padding, ``x[i] = y``, ...

They are applied to the label tensors with torch itself, so no per-operation index bookkeeping is
needed and channel shuffles, flattens before a Linear or head splits come out right by construction.
Two kinds of notes are left for :func:`prunekit.structure.dependencies.trace_dependencies` to check
once units are known: selections by constant position (``x[:, :k]``, ``narrow``, ``split`` with
sizes: a unit filling only part of that dimension must stay) and reshapes that split one dimension
in several (heads, shuffle groups: a unit must fill whole rows or the same columns of every row).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..calls import first_given, is_float_tensor, tensor_leaves
from ..heads import head_count_is_fixed
from ..labels import NONE, ids_of
from ..ops import op_name
from ..registry import register_rule

MOVE = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "swapaxes",
    "swapdims", "t", "property:T", "property:mT", "property:H", "property:mH", "squeeze", "unsqueeze", "expand",
    "expand_as", "repeat", "tile", "repeat_interleave", "chunk", "split", "tensor_split", "split_with_sizes",
    "unbind", "narrow", "select", "getitem", "index_select", "gather", "take_along_dim", "roll", "flip", "fliplr",
    "flipud", "movedim", "moveaxis", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack",
    "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle", "unfold", "broadcast_to",
    "diagonal", "tril", "triu", "masked_select", "index", "atleast_1d", "atleast_2d", "atleast_3d", "ravel",
    "where", "masked_fill", "pad",
}  # fmt: skip
_RESHAPES = ("view", "view_as", "reshape", "reshape_as", "unflatten")


def move(tracer, func, args, kwargs, out) -> None:
    """Run the same call on the labels (float tensors replaced by their labels) and label the result."""
    name = op_name(func)
    note_positional(tracer, name, args, kwargs)

    def as_label(value):
        if is_float_tensor(value):
            return tracer.full_label(value)
        if name in ("where", "masked_fill") and isinstance(value, (int, float)) and not isinstance(value, bool):
            return NONE
        return value

    label_args, label_kwargs = pytree.tree_map(as_label, (list(args), dict(kwargs)))
    if name == "pad":
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        label_args, label_kwargs = label_args[:2], {}
        if mode == "constant":  # padded positions hold a constant, no channel
            label_kwargs["value"] = NONE
        else:  # reflect, replicate, circular copy values of the same channel (they need floats)
            label_args[0], label_kwargs["mode"] = label_args[0].double(), mode
    if name == "masked_fill":
        label_args = [label_args[0], label_args[1], NONE]
        label_kwargs = {}
    if name in ("view", "view_as") and not (len(args) == 2 and isinstance(args[1], torch.dtype)):
        # Label tensors are often broadcast views, which view() refuses; reshape gives the same layout.
        func = torch.Tensor.reshape if name == "view" else torch.Tensor.reshape_as
    label_out = func(*label_args, **label_kwargs)
    if name in _RESHAPES and isinstance(out, torch.Tensor):
        note_splits(tracer, tuple(args[0].shape), out, label_out)
    if name == "pad" and label_out.is_floating_point():  # ids are exact in float64 below 2**53
        label_out = label_out.long()
    for tensor, label in zip(tensor_leaves(out), tensor_leaves(label_out)):
        tracer.set_label(tensor, label)


def note_positional(tracer, name: str, args: tuple, kwargs: dict) -> None:
    """Record the dimensions a call selects by constant position (see the module docstring)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or tracer.label(x) is None or x.ndim == 0:
        return
    dims: list[int] = []
    if name == "getitem":
        dims = indexed_dims(x, args[1])
    elif name in ("narrow", "select", "index_select", "unbind", "gather", "take_along_dim"):
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        dims = [dim % x.ndim] if isinstance(dim, int) else []
    elif name in ("split", "split_with_sizes", "tensor_split", "chunk"):
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0) % x.ndim
        pieces = args[1] if len(args) > 1 else first_given(kwargs, "split_size_or_sections", "split_size", "chunks")
        size = x.shape[dim]
        if name == "chunk" or (name == "tensor_split" and isinstance(pieces, int)):
            couple_pieces(tracer, x, dim, pieces)
        elif name == "split" and isinstance(pieces, int) and 1 < pieces < size and size % pieces == 0:
            # Equal pieces of a given size (GPT-2 splits its fused q, k, v by split_size) are chunk(size //
            # pieces); the compacted module must then split by the smaller size (compaction updates the
            # attributes it knows, such as GPT-2's split_size, and its check catches the rest).
            couple_pieces(tracer, x, dim, size // pieces)
        else:
            dims = [dim]
    for dim in dims:
        tracer.positional.append((tracer.full_label(x), dim))


def note_splits(tracer, before: tuple[int, ...], out: torch.Tensor, label: torch.Tensor) -> None:
    """Record every dimension of ``before`` that a reshape to ``out``'s shape split in several."""
    after = tuple(out.shape)
    i = j = 0
    split = False
    while i < len(before) and j < len(after):
        start_i, start_j = i, j
        size_in, size_out = before[i], after[j]
        while size_in != size_out:
            if size_in < size_out:
                i += 1
                size_in *= before[i]
            else:
                j += 1
                size_out *= after[j]
        dims = [d for d in range(start_j, j + 1) if after[d] > 1]
        if i == start_i and len(dims) > 1:
            if not split and head_count_is_fixed(tracer.running_module()):
                tracer.fixed_head_splits.append(label)
            split = True
            for cut in range(1, len(dims)):
                tracer.splits.append((label, tuple(dims[:cut]), tuple(dims[cut:])))
        i, j = i + 1, j + 1


def couple_pieces(tracer, x: torch.Tensor, dim: int, count: int) -> None:
    """chunk(n): the pieces must shrink alike to stay aligned, so position i of every piece is coupled."""
    label = tracer.full_label(x)
    size = x.shape[dim]
    if count <= 1 or size % count:
        tracer.positional.append((label, dim))
        return
    pieces = ids_of(label).movedim(dim, 0).reshape(count, size // count, -1)
    for piece in pieces[1:]:
        tracer.graph.join(pieces[0], piece)


def write(tracer, func, args, kwargs, out) -> None:
    """``x[i] = y`` and ``x.copy_(y)``: the written positions take y's labels (the tracer keeps x's labels
    from before the write in ``tracer.before_write``)."""
    target = args[0]
    if op_name(func) == "copy":
        tracer.set_label(target, tracer.full_label(args[1]).expand(tuple(target.shape)).clone())
        return
    value = args[2]
    new = tracer.before_write.clone()
    new[args[1]] = tracer.full_label(value) if is_float_tensor(value) else NONE
    tracer.set_label(target, new)


def indexed_dims(x: torch.Tensor, index: Any) -> list[int]:
    """The dimensions of ``x`` that ``x[index]`` selects only part of."""
    items = list(index) if isinstance(index, tuple) else [index]
    consumed = [(1 if not isinstance(i, torch.Tensor) or i.dtype != torch.bool else i.ndim) for i in items]
    consumed = [0 if i is None or i is Ellipsis else n for i, n in zip(items, consumed)]
    partial, dim = [], 0
    for item, width in zip(items, consumed):
        if item is Ellipsis:
            dim += x.ndim - sum(consumed)
            continue
        if isinstance(item, slice):
            if tuple(range(*item.indices(x.shape[dim]))) != tuple(range(x.shape[dim])):
                partial.append(dim)
        elif item is not None:
            partial.extend(range(dim, dim + width))
        dim += width
    return partial


register_rule(sorted(MOVE), move)
register_rule(["setitem", "copy"], write)
