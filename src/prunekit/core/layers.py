"""The layer registry: what prunekit knows about each kind of layer, stated once.

A :class:`LayerHandler` says, for one module type:

- which of its tensors are prunable weights (``weights``), and whether each is stored (out, in, ...)
  or (in, out, ...) (``transposed``), so every weight is seen through one ``(O, I, K)`` view;
- which bias belongs to a weight's outputs (:meth:`LayerHandler.bias_name`);
- the float values a criterion scores (:meth:`LayerHandler.scoring_weight`; a quantized layer returns its
  dequantized weight);
- how its size attributes follow its tensors once compaction has sliced them
  (:meth:`LayerHandler.update_shape`);
- which weights its MACs count (:meth:`LayerHandler.applied_weights`: MACs = weight elements ×
  applications) and along which output dimension its applications are counted;
- whether its outputs are sums of weight × input products, which the FHE fan-in cap bounds
  (``sums_inputs``);
- optionally, how the structure tracer maps its channels when it cannot follow the forward through the
  weights themselves (``channels``: a :class:`ChannelMap`), which makes the module a leaf of the trace.

Targets (:mod:`prunekit.core.targets`), the structure tracer, compaction, :func:`prunekit.summary` and
:mod:`prunekit.fhe` all ask this registry, so a new layer type is supported everywhere by one
:func:`register_layer` call::

    class Int8Linear(nn.Module): ...   # weight stored as int8 plus a per-row scale

    pk.register_layer(Int8Linear, pk.LayerHandler(
        weights=("qweight",),
        scoring_weight=lambda m, name: m.qweight.float() * m.scale[:, None],
        update_shape=lambda m: setattr(m, "out_features", m.qweight.shape[0]),
        channels=pk.ChannelMap(consumes={"qweight": 1}, produces={"qweight": 0, "scale": 0, "bias": 0}),
    ))

The lookup walks the module's class hierarchy (most specific class first); handlers registered with a
predicate instead of a type (``register_layer(lambda m: ..., handler)``) are asked after that, in
registration order. A later registration for the same type replaces the earlier one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn


@dataclass(frozen=True)
class ChannelMap:
    """How a leaf layer's channels run, for the structure tracer.

    ``consumes``: ``{tensor name: dim}`` of the module's tensors whose ``dim`` indexes the channels of
    its (first) input along ``input_dim``; ``produces``: ``{tensor name: dim}`` of the tensors whose
    ``dim`` indexes the channels of its output along ``output_dim``. Tensors may be parameters or
    buffers. Example, a Linear-like layer with weight (out, in): ``consumes={"weight": 1},
    produces={"weight": 0, "bias": 0}``.
    """

    consumes: dict[str, int] = field(default_factory=dict)
    produces: dict[str, int] = field(default_factory=dict)
    input_dim: int = -1
    output_dim: int = -1


def weight_as_is(module: nn.Module, weight_name: str) -> torch.Tensor:
    """The default :attr:`LayerHandler.scoring_weight`: the weight itself, detached."""
    return getattr(module, weight_name).detach()


def _no_shape_update(module: nn.Module) -> None:
    return None


def output_positions(module: nn.Module, inputs: tuple, output: torch.Tensor, channel_dim: int) -> int:
    """How many times a layer applied its weights in one call: output elements per output channel."""
    return output.numel() // output.shape[channel_dim]


def _input_positions(module: nn.Module, inputs: tuple, output: torch.Tensor, channel_dim: int) -> int:
    # A transposed convolution applies every weight once per *input* position.
    return inputs[0].numel() // inputs[0].shape[1]


@dataclass(frozen=True)
class LayerHandler:
    """What prunekit needs to know about one kind of layer (see the module docstring).

    Attributes:
        weights: names of the prunable weights (module attributes of 2 or more dims; the missing ones
            are skipped, so one handler serves optional weights).
        transposed: True when the weights are stored (in, out, ...), as in ConvTranspose and Hugging
            Face's Conv1D.
        biases: ``{weight name: bias name or None}``; a weight not listed has the bias ``"bias"``.
        scoring_weight: ``fn(module, weight name) -> float tensor`` of the weight's shape that criteria
            score (default: the weight itself).
        update_shape: ``fn(module)`` making the module's size attributes agree with its tensors after
            compaction sliced them.
        sums_inputs: every output is a sum of weight × input products (Linear, Conv, ConvTranspose);
            the FHE fan-in cap applies only to such layers.
        default_target: pruned by default (True) or only when named in ``include=`` (False).
        output_channel_dim: the dimension of the module's output that indexes its output channels,
            used to count applications (MACs) of its weights: -1 for Linear-like layers, 1 for convs.
        channels: a :class:`ChannelMap` to trace the module as a leaf, or None to trace through it.
        counts_macs: whether :func:`prunekit.summary` counts MACs of the applied weights.
        positions: ``fn(module, inputs, output, output_channel_dim) -> int``, how many times one call
            applies the weights (default: output elements per output channel).
    """

    weights: tuple[str, ...] = ("weight",)
    transposed: bool = False
    biases: dict[str, str | None] = field(default_factory=dict)
    scoring_weight: Callable[[nn.Module, str], torch.Tensor] = weight_as_is
    update_shape: Callable[[nn.Module], None] = _no_shape_update
    sums_inputs: bool = False
    default_target: bool = True
    output_channel_dim: int = -1
    channels: ChannelMap | None = None
    counts_macs: bool = True
    positions: Callable[[nn.Module, tuple, torch.Tensor, int], int] = output_positions

    def prunable_weights(self, module: nn.Module) -> list[str]:
        """The names of the module's weights that can be pruned (present, tensors of ≥ 2 dims)."""
        found = []
        for name in self.weights:
            value = module._parameters.get(name)
            if value is None:
                value = module._buffers.get(name)
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                found.append(name)
        return found

    def bias_name(self, weight_name: str) -> str | None:
        """The name of the bias that belongs to ``weight_name``'s outputs (None: it has none)."""
        return self.biases.get(weight_name, "bias")

    def applied_weights(self, module: nn.Module) -> list[torch.Tensor]:
        """The weights whose elements × applications count the module's MACs."""
        if not self.counts_macs:
            return []
        return [getattr(module, name) for name in self.prunable_weights(module)]

    def with_options(self, **changes) -> LayerHandler:
        """A copy with some fields changed (handlers are frozen)."""
        return replace(self, **changes)


_BY_TYPE: dict[type, LayerHandler] = {}
_BY_PREDICATE: list[tuple[Callable[[nn.Module], bool], LayerHandler]] = []


def register_layer(kind: type | Callable[[nn.Module], bool], handler: LayerHandler) -> LayerHandler:
    """Register ``handler`` for a module type (and its subclasses) or for the modules a predicate
    ``fn(module) -> bool`` accepts. Returns the handler. A type registered again replaces its handler."""
    if not isinstance(handler, LayerHandler):
        raise TypeError(f"register_layer takes a pk.LayerHandler, got {type(handler).__name__}")
    if isinstance(kind, type):
        if not issubclass(kind, nn.Module):
            raise TypeError(f"register_layer takes an nn.Module subclass, got {kind.__name__}")
        _BY_TYPE[kind] = handler
    elif callable(kind):
        _BY_PREDICATE.append((kind, handler))
    else:
        raise TypeError(f"register_layer takes a module type or a predicate fn(module) -> bool, got {kind!r}")
    return handler


def unregister_layer(kind: type | Callable[[nn.Module], bool]) -> None:
    """Forget the handler registered for ``kind`` (a type or the very predicate registered)."""
    if isinstance(kind, type):
        _BY_TYPE.pop(kind, None)
    else:
        _BY_PREDICATE[:] = [(p, h) for p, h in _BY_PREDICATE if p is not kind]


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of ``module``'s most specific registered class, else of the first predicate that
    accepts it, else None."""
    for cls in type(module).__mro__:
        handler = _BY_TYPE.get(cls)
        if handler is not None:
            return handler
    for predicate, handler in _BY_PREDICATE:
        if predicate(module):
            return handler
    return None


def handler_for_type(module_type: type) -> LayerHandler | None:
    """The handler registered for ``module_type`` or its nearest registered base class."""
    for cls in module_type.__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
    return None


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's projections): a Linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)


# ---------------------------------------------------------------------------------- built-in layers


def _linear_shape(module: nn.Linear) -> None:
    module.out_features, module.in_features = module.weight.shape


def _conv_shape(module: nn.modules.conv._ConvNd) -> None:
    weight = module.weight
    # Grouped convs lose whole groups, so filters per group stay as they were.
    if module.groups > 1:
        module.groups = weight.shape[0] // (module.out_channels // module.groups)
    module.out_channels = weight.shape[0]
    module.in_channels = weight.shape[1] * module.groups


def _conv_transpose_shape(module: nn.modules.conv._ConvTransposeNd) -> None:
    module.in_channels = module.weight.shape[0]
    module.out_channels = module.weight.shape[1] * module.groups


def _hf_conv1d_shape(module: nn.Module) -> None:
    module.nf = module.weight.shape[1]


def _norm_shape(module: nn.modules.batchnorm._NormBase) -> None:
    reference = module.weight if module.weight is not None else module.running_mean
    if reference is not None:
        module.num_features = reference.shape[0]


def _group_norm_shape(module: nn.GroupNorm) -> None:
    if module.weight is not None:
        module.num_groups = module.weight.shape[0] // (module.num_channels // module.num_groups)
        module.num_channels = module.weight.shape[0]


def _layer_norm_shape(module: nn.LayerNorm) -> None:
    if module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)


def _embedding_shape(module: nn.Embedding) -> None:
    module.embedding_dim = module.weight.shape[1]


#: nn.MultiheadAttention's projection weights and the bias that goes with each. Its shape update
#: (head counts, a pruned forward) is registered by :mod:`prunekit.attention`.
MULTIHEAD_ATTENTION_WEIGHTS = {
    "in_proj_weight": "in_proj_bias",
    "q_proj_weight": None,
    "k_proj_weight": None,
    "v_proj_weight": None,
}

register_layer(nn.Linear, LayerHandler(update_shape=_linear_shape, sums_inputs=True))
register_layer(nn.modules.conv._ConvNd, LayerHandler(update_shape=_conv_shape, sums_inputs=True, output_channel_dim=1))
register_layer(
    nn.modules.conv._ConvTransposeNd,
    LayerHandler(
        transposed=True,
        update_shape=_conv_transpose_shape,
        sums_inputs=True,
        output_channel_dim=1,
        positions=_input_positions,
    ),  # fmt: skip
)
register_layer(is_hf_conv1d, LayerHandler(transposed=True, update_shape=_hf_conv1d_shape))
register_layer(
    nn.MultiheadAttention,
    # Its projections run through functional calls: the summary counts their MACs on its own.
    LayerHandler(weights=tuple(MULTIHEAD_ATTENTION_WEIGHTS), biases=MULTIHEAD_ATTENTION_WEIGHTS, counts_macs=False),
)
register_layer(nn.Embedding, LayerHandler(update_shape=_embedding_shape, default_target=False, counts_macs=False))
register_layer(nn.modules.batchnorm._NormBase, LayerHandler(weights=(), update_shape=_norm_shape, default_target=False))
register_layer(nn.GroupNorm, LayerHandler(weights=(), update_shape=_group_norm_shape, default_target=False))
register_layer(nn.LayerNorm, LayerHandler(weights=(), update_shape=_layer_norm_shape, default_target=False))
