"""Trace a model once and record which channels must be removed together.

The model runs eagerly on the example inputs under a :class:`torch.overrides.TorchFunctionMode`.
Beside every activation the tracer keeps a *label tensor* of the same shape: each element holds the
channel id it carries (see :mod:`prunekit.structure.channels`), or −1 for plain data (inputs,
constants). Labels are encoded as ``2·id + z``, where ``z = 1`` says "this element is exactly zero
when its channel is pruned"; a layer that consumes a channel whose value would *not* be zero (say
``sigmoid(x)`` or ``x + 1``) cannot drop it exactly, so that channel is pinned.

The point of labels: operations that only move data (view, reshape, permute, cat, split, flatten,
indexing, expand, pixel shuffle, ...) are applied to the label tensors with torch itself, so no
per-operation index bookkeeping is needed for them, and channel shuffles, flattens before a Linear
or head splits come out right by construction. Only operations that *mix* values need a rule:
elementwise arithmetic couples the channels it combines, reductions keep labels that are constant
along the reduced dimensions (and pin channels they would mix), and layers (linear, conv, norms,
embedding, matmul, attention) consume and produce channels. Anything else that touches a labelled
tensor raises :class:`UnsupportedOperationError` naming the operation and the module, unless that
module is excluded (then it is treated as a black box whose inputs and outputs are left alone).
"""

from __future__ import annotations

import inspect
import math
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from .channels import PINNED, ChannelGraph

NONE = -1
PINNED_LABEL = 2 * PINNED  # id 0, not zero-preserving


class UnsupportedOperationError(RuntimeError):
    """The tracer met an operation it cannot follow channels through."""


def encode(ids: torch.Tensor, zero_ok: bool | torch.Tensor) -> torch.Tensor:
    label = ids * 2
    label += zero_ok if isinstance(zero_ok, torch.Tensor) else int(bool(zero_ok))
    # A negative id gives 2·id + z ≤ −1: clamping maps it to NONE (one call, where torch.where needs three).
    return label.clamp_min_(NONE)


def ids_of(label: torch.Tensor) -> torch.Tensor:
    return label >> 1  # −1 stays −1 (arithmetic shift)


def zero_ok_of(label: torch.Tensor) -> torch.Tensor:
    return (label >= 0) & ((label & 1) == 1)


# ---------------------------------------------------------------------------- operation families

_IDENTITY = {
    "float", "double", "half", "bfloat16", "to", "type", "type_as", "cpu", "cuda", "contiguous", "clone",
    "detach", "requires_grad", "alias", "property:data", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "identity",
}  # fmt: skip
_MOVE = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "swapaxes",
    "swapdims", "t", "property:T", "property:mT", "property:H", "property:mH", "squeeze", "unsqueeze", "expand",
    "expand_as", "repeat", "tile", "repeat_interleave", "chunk", "split", "tensor_split", "split_with_sizes",
    "unbind", "narrow", "select", "getitem", "index_select", "gather", "take_along_dim", "roll", "flip", "fliplr",
    "flipud", "movedim", "moveaxis", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack",
    "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle", "unfold", "broadcast_to",
    "diagonal", "tril", "triu", "masked_select", "index", "atleast_1d", "atleast_2d", "atleast_3d", "ravel",
    "where", "masked_fill", "pad", "setitem", "copy",
}  # fmt: skip
# Elementwise operations, by how a pruned (zero) operand shows in the result.
# Results that hold no channel data: new tensors shaped like an input, or filled in place.
_FRESH = {
    "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zeros_like", "ones_like", "full_like",
    "empty_like", "rand_like", "randn_like", "randint_like", "zero", "fill", "normal", "uniform", "bernoulli",
}  # fmt: skip
_SUM_LIKE = {"add", "sub", "maximum", "minimum", "fmax", "fmin", "lerp", "addcmul", "addcdiv", "hypot"}
_PRODUCT_LIKE = {"mul", "multiply"}
_QUOTIENT_LIKE = {"div", "true_divide", "truediv", "divide", "floor_divide", "fmod", "remainder"}
_UNARY = {
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu",
    "elu", "selu", "celu", "mish", "softplus", "exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "square", "abs",
    "neg", "negative", "pow", "clamp", "clip", "clamp_min", "clamp_max", "sin", "cos", "erf", "erfc",
    "reciprocal", "sign", "sgn", "floor", "ceil", "round", "trunc", "logsigmoid", "hardshrink", "softshrink",
    "softsign", "tanhshrink", "threshold", "nan_to_num", "rsub", "rtruediv", "rpow", "log_sigmoid", "exp2",
    "sinh", "cosh", "atan", "asin", "acos", "tan", "frac", "positive", "logit", "sigmoid_",
}  # fmt: skip
_REDUCE = {
    "sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod", "nansum", "nanmean",
    "median", "var_mean", "std_mean", "aminmax", "vector_norm",
}  # fmt: skip
_ALONG_DIM = {"softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp", "softmin"}
_SPATIAL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate", "upsample", "upsample_nearest",
    "upsample_bilinear", "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "fractional_max_pool2d", "grid_sample",
}  # fmt: skip
_ZERO_KEEPING_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "prod", "nansum",
                        "nanmean", "median", "vector_norm", "cumsum", "cumprod"}  # fmt: skip
_DUNDER_ALIASES = {"truediv": "div", "floordiv": "floor_divide", "mod": "remainder", "and": "logical", "or": "logical",
                   "xor": "logical", "lshift": "logical", "rshift": "logical", "invert": "logical"}  # fmt: skip
_REVERSED = {"radd": "add", "rmul": "mul", "rsub": "rsub", "rtruediv": "rtruediv", "rdiv": "rtruediv",
             "rpow": "rpow", "rmatmul": "rmatmul", "rfloordiv": "rtruediv"}  # fmt: skip


def op_name(func: Callable) -> str:
    """A canonical name: ``x += y`` and ``torch.add`` are both ``add``, ``x.T`` is ``property:T``."""
    try:
        return _OP_NAMES[func]
    except KeyError:
        name = _OP_NAMES[func] = _op_name(func)
    except TypeError:  # an unhashable callable
        name = _op_name(func)
    return name


# The tracer asks for the name of every call it sees; the same few functions come back every time.
_OP_NAMES: dict[Callable, str] = {}


def _op_name(func: Callable) -> str:
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":
        return "property:" + getattr(getattr(func, "__self__", None), "__name__", "?")
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core in _REVERSED:
            return _REVERSED[core]
        if core.startswith("i") and core[1:] in {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul"}:
            core = core[1:]
        return _DUNDER_ALIASES.get(core, core)
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


# ---------------------------------------------------------------------------- the tracer


class ChannelTracer(TorchFunctionMode):
    """Runs under a model's forward and fills a :class:`ChannelGraph` (see the module docstring)."""

    def __init__(self, model: nn.Module, excluded: Iterable[nn.Module] = ()):
        super().__init__()
        self.graph = ChannelGraph()
        self.labels: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.owners: dict[int, tuple[str, str, torch.Tensor]] = {}
        #: (name, module) of every module, shared ones under each name (walked once: models have hundreds).
        self.named_modules = list(model.named_modules(remove_duplicate=False))
        for module_name, module in self.named_modules:
            for kind in (module._parameters, module._buffers):
                for tensor_name, tensor in kind.items():
                    if tensor is not None and id(tensor) not in self.owners:
                        self.owners[id(tensor)] = (module_name, tensor_name, tensor)
        self.excluded = {id(m) for m in excluded}
        self.module_names = {id(m): name for name, m in self.named_modules}
        self._modules = {id(m): m for _, m in self.named_modules}
        self.stack: list[str] = []
        self.opaque_depth = 0
        self._zero_test_cache: dict[Any, bool] = {}
        # Parameter lookups repeat every time a layer runs: (id, dim, size, producer, consumer) -> ids.
        self._param_ids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        #: (input labels, dim) of every selection by position (x[:, :k], narrow, split with sizes, ...):
        #: a unit that fills only part of that dimension must stay, since the positions are constants.
        self.positional: list[tuple[torch.Tensor, int]] = []
        #: (output labels, outer dims, inner dims) of every reshape that split one dimension in several
        #: (heads from a projection, groups in a channel shuffle), checked once units are known.
        self.splits: list[tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]] = []
        #: One id per attention head (per slice of an activation × activation product): the units they
        #: end up in are heads, which ``prune_only="heads"`` / ``"width"`` tell apart from channels.
        self.heads: list[torch.Tensor] = []
        #: Tensors that mix every head of an attention module (head-averaged attention weights): reading
        #: them pins those heads (tensor -> head ids).
        self.head_mixtures: WeakIdKeyDictionary = WeakIdKeyDictionary()
        # Hooks only where they are needed: on the excluded modules. A hook on every module would make each
        # module call take torch's slow path; the module an error message names is found from the Python
        # frames instead (see where).
        self._handles = []
        for module in self._modules.values():
            if id(module) in self.excluded:
                self._handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._leave, with_kwargs=True, always_call=True))

    # -------------------------------------------------------------- module bookkeeping

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter(self, module, args, kwargs):
        self.stack.append(self.module_names.get(id(module), "?"))
        if id(module) in self.excluded:
            if self.opaque_depth == 0:
                for tensor in tensor_leaves((args, kwargs)):
                    label = self.label(tensor)
                    if label is not None:
                        self.graph.pin(ids_of(label))
            self.opaque_depth += 1

    def _leave(self, module, args, kwargs, output):
        self.stack.pop()
        if id(module) in self.excluded:
            self.opaque_depth -= 1
            if self.opaque_depth == 0:
                for tensor in tensor_leaves(output):
                    if _is_float_tensor(tensor):
                        self.labels[tensor] = torch.full(tuple(tensor.shape), PINNED_LABEL, dtype=torch.int64)

    @property
    def where(self) -> str:
        """The name of the innermost module of the model whose code is running (for messages)."""
        frame = sys._getframe(1)
        while frame is not None:
            module = frame.f_locals.get("self")
            if module is not None and self._modules.get(id(module)) is module:
                return self.module_names[id(module)] or "<the model's own forward>"
            frame = frame.f_back
        return self.stack[-1] if self.stack and self.stack[-1] else "<the model's own forward>"

    # -------------------------------------------------------------- labels

    def owner(self, tensor: Any) -> tuple[str, str] | None:
        found = self.owners.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return None if found is None or found[2] is not tensor else found[:2]

    def param_ids(self, tensor: torch.Tensor, dim: int, producer: bool = False, consumer: bool = False) -> torch.Tensor:
        key = (id(tensor), dim, tensor.shape[dim], producer, consumer)
        found = self._param_ids.get(key)
        if found is not None and found[0] is tensor:  # the same call again: nothing new to record
            return found[1]
        owner, name = self.owner(tensor)
        ids = self.graph.ids(owner, name, dim % tensor.ndim, tensor.shape[dim], producer, consumer)
        self._param_ids[key] = (tensor, ids)
        return ids

    def label(self, tensor: Any) -> torch.Tensor | None:
        """The label tensor of an activation or parameter (None for plain data)."""
        if not isinstance(tensor, torch.Tensor):
            return None
        found = self.labels.get(tensor)
        if found is not None:
            return found
        dim = self._parameter_channel_dim(tensor)
        if dim is None:
            return None
        ids = self.param_ids(tensor, dim)
        shape = [1] * tensor.ndim
        shape[dim] = -1
        return encode(ids, True).reshape(shape).expand(tuple(tensor.shape))

    def _parameter_channel_dim(self, tensor: torch.Tensor) -> int | None:
        """A parameter used outside a layer (a position embedding, a layer scale, a bias table): its channels
        are its last dimension longer than 1 (None for anything else)."""
        if self.owner(tensor) is None or not isinstance(tensor, nn.Parameter):
            return None
        dims = [d for d in range(tensor.ndim) if tensor.shape[d] > 1]
        return dims[-1] if dims else None

    def has_label(self, tensor: Any) -> bool:
        """``self.label(tensor) is not None`` (with the same ids allocated), without building the label."""
        if not isinstance(tensor, torch.Tensor):
            return False
        if self.labels.get(tensor) is not None:
            return True
        dim = self._parameter_channel_dim(tensor)
        if dim is None:
            return False
        self.param_ids(tensor, dim)
        return True

    def full_label(self, tensor: torch.Tensor) -> torch.Tensor:
        found = self.label(tensor)
        return torch.full(tuple(tensor.shape), NONE, dtype=torch.int64) if found is None else found

    def set_label(self, tensor: Any, label: torch.Tensor | None, has_channels: bool = False) -> None:
        """Record ``tensor``'s labels (forgotten when None or all plain data); ``has_channels`` says the
        caller knows some entry holds a channel (saves the test)."""
        if not _is_float_tensor(tensor):
            return
        if label is None or not ((has_channels and label.numel()) or bool((_unbroadcast(label) >= 0).any())):
            self.labels.pop(tensor, None)
            return
        if tuple(label.shape) != tuple(tensor.shape):
            label = label.expand(tuple(tensor.shape))
        self.labels[tensor] = label

    # -------------------------------------------------------------- dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        if name in ("setitem", "copy"):
            return self._write_call(name, func, args, kwargs)
        out = func(*args, **kwargs)
        if self.opaque_depth:
            return out
        # has_label on every input, not just up to the first labelled one: it gives a parameter its ids
        # as label() would, so ids are allocated in the same order whatever the call returns.
        if not any([self.has_label(t) for t in tensor_leaves((args, kwargs))]):
            return out
        if not any(_is_float_tensor(t) for t in tensor_leaves(out)):
            return out
        try:
            self._rule(name, func, args, kwargs, out)
        except UnsupportedOperationError:
            raise
        except Exception as error:  # a rule failed on an unexpected call form: say where, never guess
            raise UnsupportedOperationError(
                f"prunekit cannot follow channels through {name!r} in module {self.where!r} "
                f"({type(error).__name__}: {error}); exclude that module (exclude=[{self.where!r}]) to leave it "
                "unpruned, or report the operation"
            ) from error
        return out

    def _write_call(self, name, func, args, kwargs):
        """``x[i] = y`` and ``x.copy_(y)``: the labels of ``x`` before the write are needed after it."""
        before = None if self.opaque_depth else self.full_label(args[0]).clone()
        out = func(*args, **kwargs)
        if self.opaque_depth:
            return out
        if any([self.has_label(t) for t in tensor_leaves((args, kwargs))]):
            self._write(name, args, kwargs, before)
        else:
            self.set_label(args[0], None)
        return out

    def _rule(self, name, func, args, kwargs, out) -> None:
        if len(self.head_mixtures):
            for tensor in tensor_leaves((args, kwargs)):
                heads = self.head_mixtures.get(tensor)
                if heads is not None:
                    self.graph.pin(heads)
        if name in _IDENTITY:
            self.set_label(out, self.label(args[0]))
        elif name in _FRESH:
            self.set_label(out, None)
        elif name in _MOVE:
            self._move(name, func, args, kwargs, out)
        elif name in _SUM_LIKE or name in _PRODUCT_LIKE or name in _QUOTIENT_LIKE or name in _UNARY:
            self._elementwise(name, func, args, kwargs, out)
        elif name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            self._elementwise("maximum", func, args, kwargs, out)
        elif name in _REDUCE:
            self._reduce(name, args, kwargs, out)
        elif name in _ALONG_DIM:
            self._along_dim(name, args, kwargs, out)
        elif name == "normalize":
            self.set_label(out, self.label(args[0]))
        elif name in _SPATIAL:
            self._spatial(name, args, kwargs, out)
        elif name == "linear":
            self._linear(*_bind(args, kwargs, ("input", "weight", "bias")), out)
        elif name in ("conv1d", "conv2d", "conv3d"):
            self._conv(
                *_bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups")), out
            )
        elif name.startswith("conv_transpose"):
            self._conv_transpose(args, kwargs, out)
        elif name == "batch_norm" or name == "instance_norm":
            self._batch_norm(name, args, kwargs, out)
        elif name in ("layer_norm", "rms_norm"):
            self._layer_norm(args, kwargs, out)
        elif name == "group_norm":
            self._group_norm(*_bind(args, kwargs, ("input", "num_groups", "weight", "bias")), out)
        elif name == "embedding":
            self._embedding(*_bind(args, kwargs, ("input", "weight")), out)
        elif name in ("matmul", "mm", "bmm", "rmatmul"):
            a, b = args[0], args[1]
            self._matmul(*((b, a) if name == "rmatmul" else (a, b)), out)
        elif name in ("addmm", "baddbmm", "addbmm"):
            bias, a, b = _bind(args, kwargs, ("input", "mat1", "mat2"))[:3]
            self._matmul(a, b, out, bias)
        elif name == "scaled_dot_product_attention":
            self._attention(*_bind(args, kwargs, ("query", "key", "value", "attn_mask")), kwargs, out)
        elif name == "einsum":
            self._einsum(args, out)
        elif name == "glu":
            self._glu(args, kwargs, out)
        elif name in ("multi_head_attention_forward", "pruned_multi_head_attention_forward"):
            self._multi_head_attention(func, args, kwargs, out)
        else:
            raise UnsupportedOperationError(
                f"prunekit cannot follow channels through the operation {name!r} in module {self.where!r}; "
                f"exclude that module (exclude=[{self.where!r}]) to leave it unpruned, or report the operation"
            )

    # -------------------------------------------------------------- data movement

    def _move(self, name, func, args, kwargs, out) -> None:
        self._note_positional(name, args, kwargs)

        def as_label(value):
            if _is_float_tensor(value):
                return self.full_label(value)
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
        if name in ("view", "view_as", "reshape", "reshape_as", "unflatten") and isinstance(out, torch.Tensor):
            self._note_splits(tuple(args[0].shape), out, label_out)
        if name == "pad" and label_out.is_floating_point():  # ids are exact in float64 below 2**53
            label_out = label_out.long()
        for tensor, label in zip(tensor_leaves(out), tensor_leaves(label_out)):
            self.set_label(tensor, label)

    def _note_positional(self, name, args, kwargs) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or self.label(x) is None or x.ndim == 0:
            return
        dims: list[int] = []
        if name == "getitem":
            dims = _indexed_dims(x, args[1])
        elif name in ("narrow", "select", "index_select", "unbind", "gather", "take_along_dim"):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            dims = [dim % x.ndim] if isinstance(dim, int) else []
        elif name in ("split", "split_with_sizes", "tensor_split", "chunk"):
            dim = kwargs.get("dim", args[2] if len(args) > 2 else 0) % x.ndim
            pieces = args[1] if len(args) > 1 else _first(kwargs, "split_size_or_sections", "split_size", "chunks")
            size = x.shape[dim]
            if name == "chunk" or (name == "tensor_split" and isinstance(pieces, int)):
                self._couple_pieces(x, dim, pieces)
            elif name == "split" and isinstance(pieces, int) and 1 < pieces < size and size % pieces == 0:
                # Equal pieces of a given size (GPT-2 splits its fused q, k, v by split_size) are chunk(size //
                # pieces); the compacted module must then split by the smaller size (compaction updates the
                # attributes it knows, such as GPT-2's split_size, and its check catches the rest).
                self._couple_pieces(x, dim, size // pieces)
            else:
                dims = [dim]
        for dim in dims:
            self.positional.append((self.full_label(x), dim))

    def _note_splits(self, before: tuple[int, ...], out: torch.Tensor, label: torch.Tensor) -> None:
        after = tuple(out.shape)
        i = j = 0
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
                for cut in range(1, len(dims)):
                    self.splits.append((label, tuple(dims[:cut]), tuple(dims[cut:])))
            i, j = i + 1, j + 1

    def _couple_pieces(self, x, dim, count) -> None:
        """chunk(n): the pieces must shrink alike to stay aligned, so position i of every piece is coupled."""
        label = self.full_label(x)
        size = x.shape[dim]
        if count <= 1 or size % count:
            self.positional.append((label, dim))
            return
        pieces = ids_of(label).movedim(dim, 0).reshape(count, size // count, -1)
        for piece in pieces[1:]:
            self.graph.join(pieces[0], piece)

    def _write(self, name, args, kwargs, before) -> None:
        """``x[i] = y`` and ``x.copy_(y)``: the written positions take y's labels."""
        target = args[0]
        if name == "copy":
            self.set_label(target, self.full_label(args[1]).expand(tuple(target.shape)).clone())
            return
        value = args[2]
        new = before.clone()
        new[args[1]] = self.full_label(value) if _is_float_tensor(value) else NONE
        self.set_label(target, new)

    # -------------------------------------------------------------- elementwise

    def _elementwise(self, name, func, args, kwargs, out) -> None:
        tensors = [a for a in tensor_leaves(list(args)) if _is_float_tensor(a)]
        scalars = [a for a in args[:2] if isinstance(a, (int, float)) and not isinstance(a, bool)]
        shape = tuple(out.shape)
        labelled = [t for t in tensors if self.label(t) is not None]
        if len(labelled) == 1:
            # One channel-carrying operand (activation functions, scaling, adding a constant): nothing to
            # couple, and the result keeps its labels, zero-preserving or not.
            label = self.label(labelled[0]).expand(shape)  # a stored label (or a parameter's): has channels
            if name in _PRODUCT_LIKE:
                keeps = True
            elif name in _QUOTIENT_LIKE:
                keeps = labelled[0] is args[0]
            elif name in _SUM_LIKE:
                keeps = len(tensors) == 1 and all(value == 0 for value in scalars)
            else:
                keeps = self._keeps_zero(func, args, kwargs)
            self.set_label(out, label if keeps else torch.where(label >= 0, label & ~1, label), has_channels=True)
            return
        labels = [self.full_label(t).expand(shape) for t in tensors]
        # Work on one slice of the dimensions every operand broadcasts over, and broadcast the result.
        shared = set.intersection(*(set(_broadcast_dims(label)) for label in labels)) if labels else set()
        labels = [_narrow(label, shared) for label in labels]
        shape = tuple(labels[0].shape) if labels else shape
        ids = torch.stack([ids_of(label) for label in labels])
        first = ids.amax(dim=0)  # any member will do: they are joined just below
        self.graph.join(first.expand_as(ids), ids)
        zero = torch.stack([zero_ok_of(label) for label in labels])
        if name in _PRODUCT_LIKE:
            zero_ok = zero.any(dim=0)
        elif name in _QUOTIENT_LIKE:
            zero_ok = zero[0] if tensors and tensors[0] is args[0] else torch.zeros(shape, dtype=torch.bool)
        elif name in _SUM_LIKE:
            zero_ok = zero.all(dim=0) & all(value == 0 for value in scalars)
        elif self._keeps_zero(func, args, kwargs):
            zero_ok = zero.all(dim=0)
        else:
            zero_ok = torch.zeros(shape, dtype=torch.bool)
        self.set_label(out, encode(first, zero_ok).expand(tuple(out.shape)))

    def _keeps_zero(self, func, args, kwargs) -> bool:
        """Whether f(0) == 0 for this call (tested once per function and scalar arguments)."""
        key = (func, tuple(a for a in args if not isinstance(a, torch.Tensor)), tuple(sorted(kwargs.items(), key=str)))
        try:
            hash(key)
        except TypeError:
            key = None
        if key is not None and key in self._zero_test_cache:
            return self._zero_test_cache[key]
        zero_args = [torch.zeros((), dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
        zero_kwargs = {k: v for k, v in kwargs.items() if k not in ("out", "inplace")}
        try:
            value = func(*zero_args, **zero_kwargs)
            keeps = bool((value == 0).all())
        except Exception:
            keeps = False
        if key is not None:
            self._zero_test_cache[key] = keeps
        return keeps

    # -------------------------------------------------------------- reductions

    def _reduced_dims(self, name, args, kwargs, x) -> tuple[int, ...] | None:
        position = 2 if name in ("norm", "vector_norm") else 1
        dim = kwargs.get("dim", args[position] if len(args) > position else None)
        if name == "norm" and len(args) > 1 and not isinstance(args[1], (int, float, str, type(None))):
            dim = args[1]
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            return tuple(range(x.ndim))
        if isinstance(dim, int):
            return (dim % max(x.ndim, 1),)
        return tuple(d % x.ndim for d in dim)

    def _constant_along(self, label: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """Labels constant along ``dims`` (kept with size 1 there); channels that vary along them are mixed
        by the operation, so they are pinned and their positions become plain data."""
        if not dims:
            return label
        full = [1 if d in dims else size for d, size in enumerate(label.shape)]
        label = _unbroadcast(label)  # a broadcast dimension is constant by construction
        if all(label.shape[d] == 1 for d in dims):  # the usual case: a layer's output, broadcast over pixels
            return label.expand(full)
        low = label.amin(dim=dims, keepdim=True)
        high = label.amax(dim=dims, keepdim=True)
        constant = low == high
        if not bool(constant.all()):
            mixed = label[~constant.expand(label.shape)]
            self.graph.pin(ids_of(mixed))
        return torch.where(constant, low, torch.full_like(low, NONE)).expand(full)

    def _reduce(self, name, args, kwargs, out) -> None:
        x = args[0]
        dims = self._reduced_dims(name, args, kwargs, x)
        kept = self._constant_along(self.full_label(x), dims)
        if name not in _ZERO_KEEPING_REDUCE:
            kept = encode(ids_of(kept), False)
        for tensor in tensor_leaves(out):
            if not _is_float_tensor(tensor):
                continue
            label = kept
            if tensor.ndim != label.ndim:
                label = label.squeeze(dims) if dims else label
            self.set_label(tensor, label.reshape(tuple(tensor.shape)) if label.numel() == tensor.numel() else None)

    def _along_dim(self, name, args, kwargs, out) -> None:
        x = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        dims = tuple(range(x.ndim)) if dim is None else (dim % x.ndim,)
        kept = self._constant_along(self.full_label(x), dims)
        if name not in _ZERO_KEEPING_REDUCE:
            kept = encode(ids_of(kept), False)
        self.set_label(out, kept.expand(tuple(out.shape)))

    def _spatial(self, name, args, kwargs, out) -> None:
        """Pooling and resizing work per channel over the trailing spatial dimensions."""
        x = args[0] if args else kwargs["input"]
        match = re.search(r"(\d)d", name)
        spatial = int(match.group(1)) if match else x.ndim - 2
        dims = tuple(range(x.ndim - spatial, x.ndim))
        kept = self._constant_along(self.full_label(x), dims)
        if name == "grid_sample":  # samples outside the grid read zeros only with padding_mode="zeros"
            kept = encode(ids_of(kept), kwargs.get("padding_mode", "zeros") == "zeros" and zero_ok_of(kept))
        for tensor in tensor_leaves(out):
            if _is_float_tensor(tensor):
                self.set_label(tensor, kept.expand(tuple(tensor.shape)))

    # -------------------------------------------------------------- layers

    def consume(self, label: torch.Tensor | None, dim: int, ids: torch.Tensor | None) -> None:
        """A layer contracts ``dim`` of its input against ``ids`` (its own input-channel ids): the channel
        found at index i is joined to ``ids[i]``; with ``ids`` None the channels are pinned (the layer
        cannot shrink along that dimension)."""
        if label is None:
            return
        dim = dim % label.ndim
        per_index = self._constant_along(label, tuple(d for d in range(label.ndim) if d != dim)).reshape(-1)
        channel = ids_of(per_index)
        # A channel that is not zero where it is pruned changes the layer's output: it must stay.
        self.graph.pin_labels(per_index)
        if ids is None:
            self.graph.pin(channel)
        else:
            self.graph.join(channel, ids)

    def produce(self, shape: tuple[int, ...], dim: int, ids: torch.Tensor, zero_ok: bool = True) -> torch.Tensor:
        view = [1] * len(shape)
        view[dim % len(shape)] = -1
        return encode(ids, zero_ok).reshape(view).expand(shape)

    def _join_param(self, tensor: Any, dim: int, ids: torch.Tensor) -> bool:
        """Join a layer's bias or norm parameter (or buffer) to the channel ids; False when absent."""
        if tensor is None or self.owner(tensor) is None:
            return False
        self.graph.join(self.param_ids(tensor, dim), ids)
        return True

    def _opaque_weight(self, *tensors) -> None:
        for tensor in tensors:
            label = self.label(tensor)
            if label is not None:
                self.graph.pin(ids_of(label))

    def _linear(self, x, weight, bias, out) -> None:
        if self.owner(weight) is None:  # a computed weight (hypernetwork, weight norm): channels stay
            self._opaque_weight(x, weight, bias)
            self.set_label(out, None)
            return
        self.consume(self.label(x), -1, self.param_ids(weight, 1, consumer=True))
        out_ids = self.param_ids(weight, 0, producer=True)
        self._join_param(bias, 0, out_ids)
        self.set_label(out, self.produce(tuple(out.shape), -1, out_ids), has_channels=True)

    def _conv(self, x, weight, bias, stride, padding, dilation, groups, out) -> None:
        groups = 1 if groups is None else int(groups)
        if self.owner(weight) is None:
            self._opaque_weight(x, weight, bias)
            self.set_label(out, None)
            return
        channel_dim = 1 if x.ndim == weight.ndim else 0
        out_ids = self.param_ids(weight, 0, producer=True)
        if groups == 1:
            self.consume(self.label(x), channel_dim, self.param_ids(weight, 1, consumer=True))
        else:
            # Grouped and depthwise convs: a whole group (its input channels and its filters) is one unit,
            # so every remaining group keeps its size and the conv stays a valid grouped conv.
            per_group_in, per_group_out = x.shape[channel_dim] // groups, weight.shape[0] // groups
            group_of_out = out_ids.reshape(groups, per_group_out)
            for column in range(1, per_group_out):
                self.graph.join(group_of_out[:, 0], group_of_out[:, column])
            per_input = group_of_out[:, 0].repeat_interleave(per_group_in)
            label = self.full_label(x)
            self.consume(label, channel_dim, per_input)
            # A group whose input channels cannot go (model inputs, plain data) cannot go either.
            channel = ids_of(label.movedim(channel_dim, 0).reshape(label.shape[channel_dim], -1).amax(dim=1))
            self.graph.pin(per_input[channel < 0])
        self._join_param(bias, 0, out_ids)
        self.set_label(out, self.produce(tuple(out.shape), channel_dim, out_ids), has_channels=True)

    def _conv_transpose(self, args, kwargs, out) -> None:
        x, weight, bias = _bind(args, kwargs, ("input", "weight", "bias"))
        groups = kwargs.get("groups", args[6] if len(args) > 6 else 1)
        if self.owner(weight) is None or groups != 1:
            self._opaque_weight(x, weight, bias)
            self.consume(self.label(x), 1 if x.ndim == weight.ndim else 0, None)
            self.set_label(out, None)
            return
        channel_dim = 1 if x.ndim == weight.ndim else 0
        self.consume(self.label(x), channel_dim, self.param_ids(weight, 0, consumer=True))
        out_ids = self.param_ids(weight, 1, producer=True)
        self._join_param(bias, 0, out_ids)
        self.set_label(out, self.produce(tuple(out.shape), channel_dim, out_ids), has_channels=True)

    def _batch_norm(self, name, args, kwargs, out) -> None:
        x, mean, var, weight, bias = _bind(args, kwargs, ("input", "running_mean", "running_var", "weight", "bias"))
        channel_dim = 1 if x.ndim > 1 else 0
        others = tuple(d for d in range(x.ndim) if d != channel_dim)
        ids = ids_of(self._constant_along(self.full_label(x), others).reshape(-1))
        affine = all([self._join_param(t, 0, ids) for t in (weight, bias)])
        for buffer in (mean, var):
            self._join_param(buffer, 0, ids)
        # A pruned channel leaves the norm as exact zeros only when its weight and bias are masked with it
        # (then (x − μ)/σ · 0 + 0 = 0 in training and in eval mode alike).
        self.set_label(out, self.produce(tuple(out.shape), channel_dim, ids, zero_ok=affine))

    def _layer_norm(self, args, kwargs, out) -> None:
        x, shape, weight, bias = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias"))
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        dims = tuple(range(x.ndim - len(shape), x.ndim))
        label = self.full_label(x)
        # Statistics over the normalised dimensions mix every channel in them: those channels must stay
        # (removing one changes the mean and variance of all the others).
        self._constant_along(label, dims)
        for tensor in (weight, bias):
            if tensor is not None and self.owner(tensor) is not None:
                for d in range(tensor.ndim):
                    if tensor.shape[d] > 1:
                        self.graph.pin(self.param_ids(tensor, d))
        self.set_label(out, torch.where(label >= 0, PINNED_LABEL, NONE).expand(tuple(out.shape)))

    def _group_norm(self, x, num_groups, weight, bias, out) -> None:
        per_channel = self._constant_along(self.full_label(x), tuple(d for d in range(x.ndim) if d != 1)).reshape(-1)
        ids = ids_of(per_channel).reshape(num_groups, -1)
        # A group's statistics mix its channels: only whole groups can go (num_groups shrinks).
        for column in range(1, ids.shape[1]):
            self.graph.join(ids[:, 0], ids[:, column])
        ids = ids.reshape(-1)
        affine = [self._join_param(t, 0, ids) for t in (weight, bias)]
        zero_ok = zero_ok_of(per_channel) & all(affine)
        self.set_label(out, encode(ids, zero_ok).reshape([-1 if d == 1 else 1 for d in range(x.ndim)]))

    def _embedding(self, indices, weight, out) -> None:
        if self.owner(weight) is None:
            self._opaque_weight(weight)
            self.set_label(out, None)
            return
        self.set_label(out, self.produce(tuple(out.shape), -1, self.param_ids(weight, 1, producer=True)))

    def _matmul(self, a, b, out, bias=None) -> None:
        if self.owner(b) is not None and b.ndim == 2:  # x @ W with W stored (in, out), as GPT-2's Conv1D
            self.consume(self.label(a), -1, self.param_ids(b, 0, consumer=True))
            out_ids = self.param_ids(b, 1, producer=True)
            self._join_param(bias, 0, out_ids)
            self.set_label(out, self.produce(tuple(out.shape), -1, out_ids), has_channels=True)
            return
        if self.owner(a) is not None and a.ndim == 2:  # W @ x
            self.consume(self.label(b), -2 if b.ndim > 1 else 0, self.param_ids(a, 1, consumer=True))
            out_ids = self.param_ids(a, 0, producer=True)
            self.set_label(out, self.produce(tuple(out.shape), -2 if out.ndim > 1 else 0, out_ids))
            return
        self._batched_product(a, b, out, extra=(bias,))

    def _batched_product(self, a, b, out, extra=()) -> None:
        """Two activations multiplied (attention scores, attention-weighted values): everything within one
        slice of the leading (batch, head) dimensions is coupled, so the unit is the head."""
        lead = tuple(out.shape[:-2]) if out.ndim > 2 else ()
        slices = math.prod(lead)
        rows = []
        for tensor in (a, b, *extra):
            if not isinstance(tensor, torch.Tensor):
                continue
            label = self.full_label(tensor)
            if label.ndim > 2:
                rows.append(label.expand(*lead, *label.shape[-2:]).reshape(slices, -1))
            else:
                rows.append(label.reshape(1, -1).expand(slices, -1))
        ids = ids_of(torch.cat(rows, dim=1))
        first = ids.amax(dim=1, keepdim=True)
        self.graph.join(first.expand_as(ids), ids)
        self.heads.append(first[:, 0])
        # Zero where a pruned head zeroes either factor (attention weights × the head's pruned values).
        zero_ok = zero_ok_of(rows[0]).all(dim=1) | zero_ok_of(rows[-1]).all(dim=1)
        label = encode(first[:, 0], zero_ok)
        shape = (*lead, 1, 1)[: out.ndim] if out.ndim >= 2 else [1] * out.ndim
        self.set_label(out, label.reshape(shape).expand(tuple(out.shape)))

    def _attention(self, q, k, v, mask, kwargs, out) -> None:
        """Scaled dot-product attention: one unit per key/value head with the query heads that share it
        (grouped-query attention); query/key/value channels and any additive mask of that head."""
        heads, kv_heads = q.shape[-3], k.shape[-3]
        group = heads // kv_heads
        lead = tuple(q.shape[:-3])
        batch = math.prod(lead) if lead else 1

        def per_head(tensor, count):
            label = self.full_label(tensor)
            label = label.expand(*lead, count, *label.shape[-2:]) if label.ndim == len(lead) + 3 else label
            return label.reshape(batch, count, -1).transpose(0, 1).reshape(count, -1)

        q_rows = per_head(q, heads).reshape(kv_heads, -1)
        k_rows, v_rows = per_head(k, kv_heads), per_head(v, kv_heads)
        rows = [q_rows, k_rows, v_rows]
        if isinstance(mask, torch.Tensor) and _is_float_tensor(mask) and self.label(mask) is not None:
            full = self.full_label(mask).expand(*lead, heads, q.shape[-2], k.shape[-2])
            rows.append(full.reshape(batch, heads, -1).transpose(0, 1).reshape(kv_heads, -1))
        ids = ids_of(torch.cat(rows, dim=1))
        first = ids.amax(dim=1, keepdim=True).expand_as(ids)
        self.graph.join(first, ids)
        self.heads.append(first[:, 0])
        zero_ok = zero_ok_of(v_rows).all(dim=1)
        head_label = encode(first[:, 0], zero_ok).repeat_interleave(group)
        self.set_label(out, head_label.reshape(heads, 1, 1).expand(tuple(out.shape)))

    def _multi_head_attention(self, func, args, kwargs, out) -> None:
        """nn.MultiheadAttention (torch's functional form, or prunekit's for an already pruned one): one unit
        per head, made of that head's rows of the query, key and value projections (and their biases and
        bias_k/bias_v) and its columns of out_proj. The input widths are consumed by the projections'
        columns and the output width is produced by out_proj's rows, as for Linear layers."""
        call = _signature(func).bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        separate = bool(a["use_separate_proj_weight"])
        projections = (
            [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]] if separate else [a["in_proj_weight"]]
        )
        out_weight, heads = a["out_proj_weight"], int(a["num_heads"])
        attention, weights = (tuple(out) + (None,))[:2] if isinstance(out, (tuple, list)) else (out, None)
        opaque = any(self.owner(t) is None for t in (*projections, out_weight)) or any(
            a.get(name) is not None for name in ("static_k", "static_v")
        )
        if opaque:  # computed projection weights or caller-supplied keys: the module stays whole
            self._opaque_weight(*tensor_leaves((args, kwargs)))
            for tensor in tensor_leaves(out):
                if _is_float_tensor(tensor):
                    self.set_label(tensor, torch.full(tuple(tensor.shape), PINNED_LABEL, dtype=torch.int64))
            return
        # Masks are plain data to the heads: a mask computed from channels keeps those channels.
        self._opaque_weight(a["attn_mask"], a["key_padding_mask"])
        inputs = (a["query"], a["key"], a["value"])
        if separate:
            for x, weight in zip(inputs, projections):
                self.consume(self.label(x), -1, self.param_ids(weight, 1, consumer=True))
            rows = [self.param_ids(weight, 0, producer=True).reshape(heads, -1) for weight in projections]
        else:
            columns = self.param_ids(projections[0], 1, consumer=True)
            for x in inputs:
                self.consume(self.label(x), -1, columns)
            packed = self.param_ids(projections[0], 0, producer=True).reshape(3, heads, -1)
            rows = [packed.transpose(0, 1).reshape(heads, -1)]
        if a["in_proj_bias"] is not None and self.owner(a["in_proj_bias"]) is not None:
            rows.append(self.param_ids(a["in_proj_bias"], 0).reshape(3, heads, -1).transpose(0, 1).reshape(heads, -1))
        for name in ("bias_k", "bias_v"):
            if a[name] is not None and self.owner(a[name]) is not None:
                rows.append(self.param_ids(a[name], -1).reshape(heads, -1))
        rows.append(self.param_ids(out_weight, 1, consumer=True).reshape(heads, -1))
        ids = torch.cat(rows, dim=1)
        self.graph.join(ids[:, :1].expand_as(ids), ids)
        head_ids = ids[:, 0]
        self.heads.append(head_ids)
        mask = a["attn_mask"]
        if isinstance(mask, torch.Tensor) and mask.dim() == 3 and heads > 1:
            # One mask per (batch, head) pair: the caller's mask fixes the head count.
            self.graph.pin(head_ids)
        out_ids = self.param_ids(out_weight, 0, producer=True)
        self._join_param(a["out_proj_bias"], 0, out_ids)
        self.set_label(attention, self.produce(tuple(attention.shape), -1, out_ids))
        if not _is_float_tensor(weights):
            return
        if not a["average_attn_weights"]:  # (N, heads, L, S): a head's weights go with the head
            self.set_label(weights, self.produce(tuple(weights.shape), -3, head_ids, zero_ok=False))
            return
        # Weights averaged over the heads change when any head goes: if anything reads them (or the model
        # returns them) the heads must stay. Labelled with the head ids in turn so that a model output
        # pins them; any operation that reads them pins them too (see _rule).
        if weights.numel() < heads:
            self.graph.pin(head_ids)
        cycled = head_ids.repeat(weights.numel() // heads + 1)[: weights.numel()]
        self.set_label(weights, encode(cycled, False).reshape(tuple(weights.shape)))
        self.head_mixtures[weights] = head_ids

    def _einsum(self, args, out) -> None:
        """Activations multiplied by einsum: like a batched matmul, everything within one slice of the
        indices kept by every operand and the output (batch, heads) is coupled."""
        equation = args[0].replace(" ", "")
        operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        if "..." in equation or "->" not in equation or any(self.owner(t) is not None for t in operands):
            raise UnsupportedOperationError(
                f"prunekit follows einsum only between activations with an explicit '->' and no '...', got "
                f"{args[0]!r} in module {self.where!r}; exclude that module (exclude=[{self.where!r}])"
            )
        terms, result = equation.split("->")
        terms = terms.split(",")
        batch = [c for c in result if all(c in term for term in terms)]
        sizes = {c: out.shape[result.index(c)] for c in batch}
        slices = math.prod(sizes.values())
        rows = []
        for term, tensor in zip(terms, operands):
            label = self.full_label(tensor)
            order = [term.index(c) for c in batch] + [i for i, c in enumerate(term) if c not in batch]
            label = label.permute(order)
            rows.append(label.expand(*[sizes[c] for c in batch], *label.shape[len(batch) :]).reshape(slices, -1))
        ids = ids_of(torch.cat(rows, dim=1))
        first = ids.amax(dim=1, keepdim=True)
        self.graph.join(first.expand_as(ids), ids)
        self.heads.append(first[:, 0])
        zero_ok = torch.stack([zero_ok_of(row).all(dim=1) for row in rows]).any(dim=0)
        label = encode(first[:, 0], zero_ok).reshape([sizes[c] for c in batch])
        shape = [out.shape[i] if c in sizes else 1 for i, c in enumerate(result)]
        order = sorted(range(len(batch)), key=lambda i: result.index(batch[i]))
        label = label.permute(order).reshape(shape) if batch else label.reshape(shape)
        self.set_label(out, label.expand(tuple(out.shape)))

    def _glu(self, args, kwargs, out) -> None:
        x = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
        first, second = self.full_label(x).chunk(2, dim=dim)
        self.graph.join(ids_of(first), ids_of(second))
        self.set_label(out, encode(ids_of(first), zero_ok_of(first) | zero_ok_of(second)))


# ---------------------------------------------------------------------------- helpers


def _broadcast_dims(label: torch.Tensor) -> list[int]:
    """Dimensions along which a (broadcast) label tensor repeats one slice: stride 0, size > 1."""
    return [d for d, (stride, size) in enumerate(zip(label.stride(), label.shape)) if stride == 0 and size > 1]


def _narrow(label: torch.Tensor, dims: Iterable[int]) -> torch.Tensor:
    """The first slice along each of ``dims`` (size 1 there): one strided view, where a narrow() per
    dimension costs a call each."""
    dims = set(dims)
    if not dims:
        return label
    shape = [1 if d in dims else size for d, size in enumerate(label.shape)]
    return label.as_strided(shape, label.stride(), label.storage_offset())


def _unbroadcast(label: torch.Tensor) -> torch.Tensor:
    """One slice along every broadcast dimension (shape keeps size 1 there)."""
    return _narrow(label, _broadcast_dims(label))


def _indexed_dims(x: torch.Tensor, index: Any) -> list[int]:
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


def _leaves(tree: Any) -> list[Any]:
    return pytree.tree_leaves(tree)


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    """Every tensor in a nested structure of outputs or arguments (Hugging Face ModelOutput included)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if hasattr(tree, "to_tuple") and callable(tree.to_tuple):  # Hugging Face ModelOutput
        tree = tree.to_tuple()
    found: list[torch.Tensor] = []
    _collect_tensors(tree, found)
    return found


# Values that hold no tensor: an operation's arguments are mostly these, and telling them apart here
# is much cheaper than a pytree traversal.
_PLAIN = (int, float, bool, complex, str, bytes, type(None), type(Ellipsis), slice, torch.Size, torch.dtype,
          torch.device, torch.layout, torch.memory_format)  # fmt: skip


def _collect_tensors(tree: Any, found: list[torch.Tensor]) -> None:
    """The tensors of ``pytree.tree_leaves(tree)``, in that order: plain lists, tuples and dicts are walked
    here, anything else pytree knows (named tuples, ordered dicts, registered classes) goes to pytree."""
    kind = type(tree)
    if kind is tuple or kind is list:
        for item in tree:
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif not isinstance(item, _PLAIN):
                _collect_tensors(item, found)
    elif kind is dict:
        _collect_tensors(list(tree.values()), found)
    elif isinstance(tree, torch.Tensor):
        found.append(tree)
    elif not isinstance(tree, _PLAIN):
        found.extend(leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor))


def _first(kwargs: dict, *names: str) -> Any:
    """The first of several alternative keyword arguments that was given (None if none was)."""
    return next((kwargs[name] for name in names if name in kwargs), None)


_SIGNATURES: dict[Callable, inspect.Signature] = {}


def _signature(func: Callable) -> inspect.Signature:
    """A Python function's signature, cached (rules that bind many arguments by name use it)."""
    found = _SIGNATURES.get(func)
    if found is None:
        found = _SIGNATURES[func] = inspect.signature(func)
    return found


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...]) -> list[Any]:
    """Positional-or-keyword arguments by name (None where absent)."""
    return [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)]
