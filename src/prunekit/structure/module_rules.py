"""Module rules: tracing a layer type as a leaf, by stating which of its tensors' dimensions its inputs
and outputs are.

Some layers compute the weight they apply (a quantized Linear dequantizes ``weight_int8 * scale``
inside its forward), so the tracer, which follows parameters into ``F.linear``, sees a derived tensor
and has to keep the layer whole. A module rule says instead what the layer does to channels. It is
registered per module type with :func:`prunekit.structure.register_module_rule` and receives a
:class:`ModuleCall` after each call of such a module (the operations inside are not traced)::

    class QuantLinear(nn.Module):          # weight_int8 (out, in) int8, scale (out,), bias (out,)
        def forward(self, x):
            return F.linear(x, self.weight_int8.float() * self.scale[:, None], self.bias)

    def trace_quant_linear(call):
        call.consume(call.input(), -1, "weight_int8", 1)      # x's last dim is read by weight columns
        call.produce(call.output, -1, "weight_int8", 0, shared=("scale", "bias"))

    pk.structure.register_module_rule(QuantLinear, trace_quant_linear,
                                      update_shapes=lambda m: setattr(m, "out_features", m.bias.shape[0]))

Every tensor named in ``consume`` / ``produce`` / ``join`` (parameters or buffers of the module, of any
dtype) is then sliced by :func:`prunekit.compact` with the units it belongs to. Inputs the rule does not
consume and outputs it does not produce keep every channel (as for an excluded module).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .calls import is_float_tensor, tensor_leaves
from .errors import UnsupportedOperationError


class ModuleCall:
    """One call of a module traced by a module rule: its ``module``, ``name``, ``args``, ``kwargs`` and
    ``output``, and the methods that say how channels pass through it."""

    def __init__(self, tracer, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        self.tracer = tracer
        self.module = module
        self.name = tracer.module_names.get(id(module), "?")
        self.args, self.kwargs, self.output = args, kwargs, output
        self._consumed: set[int] = set()
        self._produced: set[int] = set()

    def input(self, index: int = 0) -> torch.Tensor:
        """The ``index``-th tensor among the positional and keyword arguments (in that order)."""
        return tensor_leaves((self.args, self.kwargs))[index]

    def tensor(self, name: str) -> torch.Tensor:
        """The module's parameter or buffer ``name``."""
        found = self.module._parameters.get(name)
        if found is None:
            found = self.module._buffers.get(name)
        if found is None:
            raise ValueError(
                f"module rule of {type(self.module).__name__} ({self.name!r}) names tensor {name!r}, which is "
                f"neither a parameter nor a buffer of the module (it has {sorted(self._names())})"
            )
        return found

    def _names(self) -> list[str]:
        return [n for n, t in (*self.module._parameters.items(), *self.module._buffers.items()) if t is not None]

    def ids(self, name: str, dim: int, *, producer: bool = False, consumer: bool = False) -> torch.Tensor:
        """The channel ids of dimension ``dim`` of the module's tensor ``name`` (one per index)."""
        return self.tracer.param_ids(self.tensor(name), dim, producer=producer, consumer=consumer)

    def consume(self, x: torch.Tensor, dim: int, name: str, tensor_dim: int) -> None:
        """Dimension ``dim`` of the input ``x`` is read by dimension ``tensor_dim`` of tensor ``name``
        (a Linear's input features by its weight's columns): index i of both goes together."""
        ids = self.ids(name, tensor_dim, consumer=True)
        if x.shape[dim] != ids.numel():
            raise ValueError(
                f"module rule of {self.name!r}: input dimension {dim} has {x.shape[dim]} entries but "
                f"{name!r} dimension {tensor_dim} has {ids.numel()}"
            )
        self.tracer.consume(self.tracer.label(x), dim, ids)
        self._consumed.add(id(x))

    def produce(
        self,
        out: torch.Tensor,
        dim: int,
        name: str,
        tensor_dim: int,
        shared: Iterable[str | tuple[str, int]] = (),
        zero_ok: bool = True,
    ) -> torch.Tensor:
        """Dimension ``dim`` of the output ``out`` is made by dimension ``tensor_dim`` of tensor ``name``
        (a Linear's output features by its weight's rows); the tensors in ``shared`` (names, for their
        dimension 0, or (name, dim) pairs: a bias, a per-row scale) hold one entry per output channel
        too and go with it. ``zero_ok``: a pruned output channel is exactly zero once all its slices
        are zeroed. Returns the output channels' ids."""
        ids = self.ids(name, tensor_dim, producer=True)
        if out.shape[dim] != ids.numel():
            raise ValueError(
                f"module rule of {self.name!r}: output dimension {dim} has {out.shape[dim]} entries but "
                f"{name!r} dimension {tensor_dim} has {ids.numel()}"
            )
        for item in shared:
            other, other_dim = (item, 0) if isinstance(item, str) else item
            self.join(other, other_dim, ids)
        self.tracer.set_label(out, self.tracer.produce(tuple(out.shape), dim, ids, zero_ok), has_channels=True)
        self._produced.add(id(out))
        return ids

    def join(self, name: str, dim: int, ids: torch.Tensor) -> None:
        """Dimension ``dim`` of tensor ``name`` goes with the channels ``ids`` (index by index)."""
        tensor = self.tensor(name)
        if tensor.shape[dim] != ids.numel():
            raise ValueError(
                f"module rule of {self.name!r}: {name!r} dimension {dim} has {tensor.shape[dim]} entries, "
                f"the channels it joins {ids.numel()}"
            )
        self.tracer.graph.join(self.tracer.param_ids(tensor, dim), ids)

    def pass_through(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` carries the channels of ``x`` unchanged (an elementwise wrapper)."""
        self.tracer.set_label(out, self.tracer.label(x))
        self._consumed.add(id(x))
        self._produced.add(id(out))

    def run(self, trace) -> None:
        """Call the rule, then keep whole whatever it left undeclared."""
        try:
            trace(self)
        except Exception as error:
            if isinstance(error, UnsupportedOperationError):
                raise
            raise UnsupportedOperationError(
                f"the module rule of {type(self.module).__name__} failed on module {self.name!r} "
                f"({type(error).__name__}: {error})"
            ) from error
        for tensor in tensor_leaves((self.args, self.kwargs)):
            if id(tensor) not in self._consumed:
                self.tracer.pin_tensors(tensor)
        for tensor in tensor_leaves(self.output):
            if id(tensor) not in self._produced and is_float_tensor(tensor):
                self.tracer.pin_outputs(tensor)
