"""Rules for elementwise operations, by how a pruned (zero) operand shows in the result.

With one channel-carrying operand nothing is coupled and the result keeps its labels; whether it stays
zero where the channel is pruned depends on the operation (``x * w`` does, ``x + 1`` does not; other
functions are tested once: f(0) == 0). Several channel-carrying operands are coupled element by
element (a residual add joins the two streams' channels).
"""

from __future__ import annotations

import torch

from ..calls import is_float_tensor, tensor_leaves
from ..labels import broadcast_dims, encode, ids_of, narrow_first, not_zero_ok, zero_ok_of
from ..ops import op_name
from ..registry import register_rule

IDENTITY = {
    "float", "double", "half", "bfloat16", "to", "type", "type_as", "cpu", "cuda", "contiguous", "clone",
    "detach", "requires_grad", "alias", "property:data", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "identity", "normalize",
}  # fmt: skip
#: Results that hold no channel data: new tensors shaped like an input, or filled in place.
FRESH = {
    "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zeros_like", "ones_like", "full_like",
    "empty_like", "rand_like", "randn_like", "randint_like", "zero", "fill", "normal", "uniform", "bernoulli",
}  # fmt: skip
SUM_LIKE = {"add", "sub", "maximum", "minimum", "fmax", "fmin", "lerp", "addcmul", "addcdiv", "hypot"}
PRODUCT_LIKE = {"mul", "multiply"}
QUOTIENT_LIKE = {"div", "true_divide", "truediv", "divide", "floor_divide", "fmod", "remainder"}
UNARY = {
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu",
    "elu", "selu", "celu", "mish", "softplus", "exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "square", "abs",
    "neg", "negative", "pow", "clamp", "clip", "clamp_min", "clamp_max", "sin", "cos", "erf", "erfc",
    "reciprocal", "sign", "sgn", "floor", "ceil", "round", "trunc", "logsigmoid", "hardshrink", "softshrink",
    "softsign", "tanhshrink", "threshold", "nan_to_num", "rsub", "rtruediv", "rpow", "log_sigmoid", "exp2",
    "sinh", "cosh", "atan", "asin", "acos", "tan", "frac", "positive", "logit", "sigmoid_",
}  # fmt: skip


def identity(tracer, func, args, kwargs, out) -> None:
    """The result carries its first argument's labels (casts, copies, dropout, normalize)."""
    tracer.set_label(out, tracer.label(args[0]))


def fresh(tracer, func, args, kwargs, out) -> None:
    """The result holds no channel data (``zeros_like``, ``fill_``, ...)."""
    tracer.set_label(out, None)


def elementwise(tracer, func, args, kwargs, out, name: str | None = None) -> None:
    """Couple the channels of every float operand element by element (see the module docstring);
    ``name`` overrides the operation's own name (``max(a, b)`` is ``maximum``)."""
    name = op_name(func) if name is None else name
    tensors = [a for a in tensor_leaves(list(args)) if is_float_tensor(a)]
    scalars = [a for a in args[:2] if isinstance(a, (int, float)) and not isinstance(a, bool)]
    shape = tuple(out.shape)
    labelled = [t for t in tensors if tracer.label(t) is not None]
    if len(labelled) == 1:
        # One channel-carrying operand (activation functions, scaling, adding a constant): nothing to
        # couple, and the result keeps its labels, zero-preserving or not.
        label = tracer.label(labelled[0]).expand(shape)  # a stored label (or a parameter's): has channels
        if name in PRODUCT_LIKE:
            keeps = True
        elif name in QUOTIENT_LIKE:
            keeps = labelled[0] is args[0]
        elif name in SUM_LIKE:
            keeps = len(tensors) == 1 and all(value == 0 for value in scalars)
        else:
            keeps = keeps_zero(tracer, func, args, kwargs)
        tracer.set_label(out, label if keeps else not_zero_ok(label), has_channels=True)
        return
    labels = [tracer.full_label(t).expand(shape) for t in tensors]
    # Work on one slice of the dimensions every operand broadcasts over, and broadcast the result.
    shared = set.intersection(*(set(broadcast_dims(label)) for label in labels)) if labels else set()
    labels = [narrow_first(label, shared) for label in labels]
    shape = tuple(labels[0].shape) if labels else shape
    ids = torch.stack([ids_of(label) for label in labels])
    first = ids.amax(dim=0)  # any member will do: they are joined just below
    tracer.graph.join(first.expand_as(ids), ids)
    zero = torch.stack([zero_ok_of(label) for label in labels])
    if name in PRODUCT_LIKE:
        zero_ok = zero.any(dim=0)
    elif name in QUOTIENT_LIKE:
        zero_ok = zero[0] if tensors and tensors[0] is args[0] else torch.zeros(shape, dtype=torch.bool)
    elif name in SUM_LIKE:
        zero_ok = zero.all(dim=0) & all(value == 0 for value in scalars)
    elif keeps_zero(tracer, func, args, kwargs):
        zero_ok = zero.all(dim=0)
    else:
        zero_ok = torch.zeros(shape, dtype=torch.bool)
    tracer.set_label(out, encode(first, zero_ok).expand(tuple(out.shape)))


def keeps_zero(tracer, func, args, kwargs) -> bool:
    """Whether f(0) == 0 for this call (tested once per function and scalar arguments, per trace)."""
    key = ("keeps_zero", func, tuple(a for a in args if not isinstance(a, torch.Tensor)))
    key += (tuple(sorted(kwargs.items(), key=str)),)
    try:
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in tracer.cache:
        return tracer.cache[key]
    zero_args = [torch.zeros((), dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
    zero_kwargs = {k: v for k, v in kwargs.items() if k not in ("out", "inplace")}
    try:
        value = func(*zero_args, **zero_kwargs)
        keeps = bool((value == 0).all())
    except Exception:
        keeps = False
    if key is not None:
        tracer.cache[key] = keeps
    return keeps


def glu(tracer, func, args, kwargs, out) -> None:
    """GLU: the two halves along ``dim`` gate each other, so channel i of both halves goes together."""
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
    first, second = tracer.full_label(x).chunk(2, dim=dim)
    tracer.graph.join(ids_of(first), ids_of(second))
    tracer.set_label(out, encode(ids_of(first), zero_ok_of(first) | zero_ok_of(second)))


register_rule(sorted(IDENTITY), identity)
register_rule(sorted(FRESH), fresh)
register_rule(sorted(SUM_LIKE | PRODUCT_LIKE | QUOTIENT_LIKE | UNARY), elementwise)
register_rule("glu", glu)
