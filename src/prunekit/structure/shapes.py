"""Shape-only execution for the tracer: what an operation returns, without computing it.

The channel tracer needs the shapes, dtypes and identities of a model's activations, never their
values. So it first runs the model on meta copies of its floating-point inputs (see
:func:`prunekit.structure.forward.run_traced`): every operation that reads a meta tensor
returns a meta tensor, the model's own parameters stay where they are (the rules find them by
identity), and nothing is computed. A forward that reads values (``if x.sum() > 0``, ``x.item()``,
``torch.nonzero``) raises on meta tensors, and the tracer then runs the model for real.

Torch's meta kernels of many common operations are Python decompositions (elementwise functions,
norms, reductions, attention) that take far longer than the layer's own bookkeeping, so those get an
output rule here (:data:`SHAPE_RULES`, extended with :func:`register_shape_rule`): a function
``(args, kwargs) -> meta tensor``, or ``NotImplemented`` to leave a call form it does not know to
torch's meta kernel. Every rule's output shape and dtype equal the real operation's (tested against
it over random arguments).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .calls import bind
from .registry import Registration

ShapeRule = Callable[[tuple, dict], Any]
#: Operation name (see :func:`prunekit.structure.ops.op_name`) -> output rule.
SHAPE_RULES: dict[str, ShapeRule] = {}
#: Operations that make an activation from the model's own tensors alone (an embedding of integer ids):
#: under shape-only tracing their output is a meta tensor even when no argument is one.
ACTIVATION_SOURCES = frozenset({"embedding"})


class ValuesNeeded(RuntimeError):
    """A shape-only trace met an operation that needs real values (an in-place write into a real tensor)."""


def register_shape_rule(names: str | Iterable[str], rule: ShapeRule) -> Registration:
    """Register ``rule(args, kwargs)`` as the output rule of the operations ``names`` (canonical names, see
    :func:`prunekit.structure.ops.op_name`), replacing any rule registered for them before. It returns a
    meta tensor of the real result's shape and dtype, or ``NotImplemented`` to leave that call to torch's
    meta kernel. Returns a handle whose ``remove()`` undoes the registration."""
    if not callable(rule):
        raise TypeError(f"a shape rule must be callable (args, kwargs), got {rule!r}")
    entries = []
    for name in [names] if isinstance(names, str) else list(names):
        if not isinstance(name, str):
            raise TypeError(f"a shape rule is registered for operation names, got {name!r}")
        entries.append((SHAPE_RULES, name, SHAPE_RULES.get(name)))
        SHAPE_RULES[name] = rule
    return Registration(entries)


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) and value.device.type != "meta" else value


def shape_call(func: Callable, name: str, /, *args: Any, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)`` computed as meta tensors: by the operation's output rule where it has one,
    else by torch's meta kernel on meta copies of every tensor argument."""
    in_place = _in_place(func, kwargs)
    if in_place:
        target = args[0] if args else None
        if not isinstance(target, torch.Tensor) or target.device.type != "meta":
            raise ValuesNeeded(f"{name!r} writes into a tensor that is not a meta tensor")
    rule = SHAPE_RULES.get(name)
    if rule is not None:
        out = rule(args, kwargs)
        if out is not NotImplemented:
            if in_place:
                if tuple(out.shape) != tuple(args[0].shape) or out.dtype != args[0].dtype:
                    raise ValuesNeeded(f"in-place {name!r} would change its target's shape or dtype")
                return args[0]
            return out
    return func(*pytree.tree_map(_to_meta, args), **pytree.tree_map(_to_meta, kwargs))


_IN_PLACE_OPERATORS = frozenset(
    f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor")
)


def _in_place(func: Callable, kwargs: dict) -> bool:
    """``x += y``, ``x.add_(y)``, ``F.relu(x, inplace=True)``: the result is written into the first argument."""
    name = getattr(func, "__name__", "") or ""
    return (
        name in _IN_PLACE_OPERATORS
        or (name.endswith("_") and not name.startswith("_"))
        or kwargs.get("inplace") is True
    )


def _meta(shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


# ---------------------------------------------------------------- same shape as the input


def _like_input(args: tuple, kwargs: dict) -> Any:
    x = args[0] if args else kwargs.get("input")
    if not _floating(x) or kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args):
        return NotImplemented  # softmax(x, dim, dtype=...) changes the dtype: torch's kernel knows
    return _meta(x.shape, x.dtype)


#: Functions of one activation (with scalar options) whose result has its shape and dtype.
SAME_SHAPE = (
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish", "hardsigmoid", "leaky_relu",
    "elu", "selu", "celu", "mish", "softplus", "softsign", "tanhshrink", "logsigmoid", "exp", "log", "sqrt",
    "rsqrt", "neg", "abs", "erf", "sin", "cos", "reciprocal", "square", "softmax", "log_softmax", "clone",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "local_response_norm", "normalize",
)  # fmt: skip
register_shape_rule(SAME_SHAPE, _like_input)


# ---------------------------------------------------------------- elementwise with broadcasting


def _binary(args: tuple, kwargs: dict) -> Any:
    a, b = bind(args, kwargs, ("input", "other"))
    if "out" in kwargs or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor)):
        return NotImplemented
    if not all(isinstance(v, (torch.Tensor, int, float, bool)) for v in (a, b)):
        return NotImplemented
    dtype = torch.result_type(a, b)
    if not dtype.is_floating_point:
        return NotImplemented  # integer division promotes, comparisons give bool: torch's kernel knows
    shapes = [v.shape for v in (a, b) if isinstance(v, torch.Tensor)]
    return _meta(torch.broadcast_shapes(*shapes), dtype)


def _both_tensors(args: tuple, kwargs: dict) -> Any:
    a, b = bind(args, kwargs, ("input", "other"))
    return _binary(args, kwargs) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else NotImplemented


register_shape_rule(("add", "sub", "mul", "div", "rsub", "pow"), _binary)
register_shape_rule(("maximum", "minimum"), _both_tensors)


# ---------------------------------------------------------------- layers


def _tuple(value: Any, count: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * count
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value) if len(value) == count else (int(value[0]),) * count
    return (int(value),) * count


def _sliding(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool = False) -> int:
    """Output length of a convolution or pooling window along one dimension (torch's formula)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:  # the last window must start inside the input
        out -= 1
    return out


def _conv(args: tuple, kwargs: dict) -> Any:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    x, weight, _, stride, padding, dilation, groups = bind(args, kwargs, names)
    spatial = weight.ndim - 2
    if x.ndim not in (spatial + 1, spatial + 2) or not _floating(x) or "out" in kwargs:
        return NotImplemented
    if x.shape[-spatial - 1] != weight.shape[1] * (1 if groups is None else int(groups)):
        return NotImplemented  # torch's kernel raises the error the real call would
    strides, dilations = _tuple(stride, spatial, 1), _tuple(dilation, spatial, 1)
    sizes = x.shape[-spatial:]
    kernels = weight.shape[2:]
    if padding == "same":
        out = list(sizes)
    else:
        pads = (0,) * spatial if padding == "valid" else _tuple(padding, spatial, 0)
        out = [_sliding(sizes[i], kernels[i], strides[i], pads[i], dilations[i]) for i in range(spatial)]
    if min(out, default=1) < 1:
        return NotImplemented
    return _meta((*x.shape[: -spatial - 1], weight.shape[0], *out), x.dtype)


def _pool(spatial: int, has_dilation: bool) -> ShapeRule:
    names = ("input", "kernel_size", "stride", "padding", "dilation" if has_dilation else "ceil_mode")

    def rule(args: tuple, kwargs: dict) -> Any:
        x, kernel, stride, padding, fourth = bind(args, kwargs, names)
        if has_dilation:
            dilation = fourth
            ceil_mode = args[5] if len(args) > 5 else kwargs.get("ceil_mode", False)
            if (args[6] if len(args) > 6 else kwargs.get("return_indices", False)) is not False:
                return NotImplemented
        else:
            dilation, ceil_mode = 1, fourth
        if not _floating(x) or x.ndim not in (spatial + 1, spatial + 2):
            return NotImplemented
        kernels = _tuple(kernel, spatial, 1)
        strides = (
            kernels
            if stride is None or (isinstance(stride, (tuple, list)) and not stride)
            else _tuple(stride, spatial, 1)
        )
        pads, dilations = _tuple(padding, spatial, 0), _tuple(dilation, spatial, 1)
        sizes = x.shape[-spatial:]
        if any(pads[i] > kernels[i] // 2 for i in range(spatial)):
            return NotImplemented  # refused by torch: its kernel says so
        out = [
            _sliding(sizes[i], kernels[i], strides[i], pads[i], dilations[i], bool(ceil_mode)) for i in range(spatial)
        ]
        if min(out, default=1) < 1:
            return NotImplemented
        return _meta((*x.shape[:-spatial], *out), x.dtype)

    return rule


def _adaptive(spatial: int) -> ShapeRule:
    def rule(args: tuple, kwargs: dict) -> Any:
        x, size = bind(args, kwargs, ("input", "output_size"))
        return_indices = args[2] if len(args) > 2 else kwargs.get("return_indices", False)
        if not _floating(x) or return_indices is not False or x.ndim not in (spatial + 1, spatial + 2):
            return NotImplemented
        sizes = [size] * spatial if isinstance(size, int) else list(size)
        out = [x.shape[-spatial + i] if s is None else int(s) for i, s in enumerate(sizes)]
        return _meta((*x.shape[:-spatial], *out), x.dtype)

    return rule


for _d in (1, 2, 3):
    register_shape_rule(f"conv{_d}d", _conv)
    register_shape_rule(f"max_pool{_d}d", _pool(_d, has_dilation=True))
    register_shape_rule(f"avg_pool{_d}d", _pool(_d, has_dilation=False))
    register_shape_rule((f"adaptive_avg_pool{_d}d", f"adaptive_max_pool{_d}d"), _adaptive(_d))


def _linear(args: tuple, kwargs: dict) -> Any:
    x, weight = bind(args, kwargs, ("input", "weight"))
    if not _floating(x) or weight.ndim != 2 or x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        return NotImplemented
    return _meta((*x.shape[:-1], weight.shape[0]), x.dtype)


def _embedding(args: tuple, kwargs: dict) -> Any:
    ids, weight = bind(args, kwargs, ("input", "weight"))
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or weight.ndim != 2:
        return NotImplemented
    return _meta((*ids.shape, weight.shape[1]), weight.dtype)


def _attention(args: tuple, kwargs: dict) -> Any:
    query, key, value = bind(args, kwargs, ("query", "key", "value"))
    if not all(_floating(t) and t.ndim >= 2 for t in (query, key, value)):
        return NotImplemented
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        return NotImplemented
    return _meta((*query.shape[:-1], value.shape[-1]), query.dtype)


def _mean(args: tuple, kwargs: dict) -> Any:
    x, dim = bind(args, kwargs, ("input", "dim"))
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if not _floating(x) or kwargs.get("dtype") is not None or not isinstance(keepdim, bool):
        return NotImplemented
    dims = range(x.ndim) if dim is None or (isinstance(dim, (tuple, list)) and not dim) else dim
    dims = {d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)}
    shape = (
        [1 if d in dims else s for d, s in enumerate(x.shape)]
        if keepdim
        else [s for d, s in enumerate(x.shape) if d not in dims]
    )
    return _meta(shape, x.dtype)


def _cat(args: tuple, kwargs: dict) -> Any:
    tensors, dim = bind(args, kwargs, ("tensors", "dim"))
    dim = 0 if dim is None else dim
    if not isinstance(dim, int) or not tensors or not all(_floating(t) for t in tensors):
        return NotImplemented
    first = tensors[0]
    if any(t.dtype != first.dtype or t.ndim != first.ndim for t in tensors) or first.ndim == 0:
        return NotImplemented
    dim %= first.ndim
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    if any(tuple(t.shape[:dim]) + tuple(t.shape[dim + 1 :]) != tuple(shape[:dim] + shape[dim + 1 :]) for t in tensors):
        return NotImplemented
    return _meta(shape, first.dtype)


register_shape_rule("linear", _linear)
register_shape_rule("embedding", _embedding)
register_shape_rule("scaled_dot_product_attention", _attention)
register_shape_rule("mean", _mean)
register_shape_rule(("cat", "concat", "concatenate"), _cat)
