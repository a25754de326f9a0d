"""Summary: parameters, non-zeros, sparsity and MACs, per layer and in total.

Over 400 lines because the table, its rows for weights, for nn.MultiheadAttention and for
activation × activation products, and the one forward pass that counts them share their bookkeeping.

MACs (multiply-accumulates) are counted for Linear, Conv, ConvTranspose and Hugging Face ``Conv1D``
(GPT-2's linear layer, weight stored (in, out)) layers from shapes, for one forward pass of
``example_inputs`` as given (batch included). A weight that is zero does no useful work, so "non-zero
MACs" counts each non-zero weight once per position it is applied at: the theoretical cost of a sparse
layer (ShrinkBench's "theoretical speedup" is dense MACs / non-zero MACs). Without ``example_inputs`` a
Linear counts as applied once and conv MACs are unknown (``None``).

With ``example_inputs``, products of two activations are counted too: attention's q·kᵀ and
attention·v, whether computed by ``F.scaled_dot_product_attention`` (``B·H·L·S·(E + Ev)`` MACs for
queries ``(B, H, L, E)``, keys ``(B, H, S, E)`` and values ``(B, H, S, Ev)``), by
``nn.MultiheadAttention`` or by ``matmul`` / ``@`` / ``bmm`` / ``baddbmm`` / two-operand ``einsum`` on
tensors that are not parameters (nor views of one: those are weight products, which layers count).
They get a row of their own per module that computed them, of kind :data:`ATTENTION_KIND`, with no
parameters; weights do not enter them, so their non-zero MACs equal their MACs. The totals include
them; :attr:`Summary.attention_macs` is their sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .core.inputs import call_model
from .core.sharding import full_tensor
from .structure.layer_weights import applications, applied_weights, counts_weight_macs, linear_like
from .structure.ops import op_name
from .structure.products import einsum_operands, is_activation_product, matrix_operands

ATTENTION_KIND = "attention (activation × activation)"
"""The ``kind`` of the rows counting products of two activations (attention scores and weighted values)."""


def _nonzero(tensor: torch.Tensor) -> int:
    """Non-zero entries of a tensor; of the whole tensor when FSDP2 shards it (an all-gather, layer by
    layer: every rank must ask for the summary)."""
    return int(torch.count_nonzero(full_tensor(tensor.detach())))


def _is_sparse_layer(module: nn.Module) -> bool:
    """prunekit.sparse's layers report their own row (a marker: the sparse package sits above this one)."""
    return getattr(module, "prunekit_sparse_layer", False) is True


def _projection_macs(module: nn.MultiheadAttention, query_tokens: int, key_tokens: int) -> tuple[int, int]:
    """(MACs, non-zero MACs) of an nn.MultiheadAttention's q, k and v projections: the query rows are
    applied at every query token, the key and value rows at every key token."""
    if module.in_proj_weight is not None:
        parts = module.in_proj_weight.detach().chunk(3)
    else:
        parts = [module.q_proj_weight.detach(), module.k_proj_weight.detach(), module.v_proj_weight.detach()]
    tokens = (query_tokens, key_tokens, key_tokens)
    macs = sum(part.numel() * count for part, count in zip(parts, tokens))
    nonzero = sum(int(torch.count_nonzero(part)) * count for part, count in zip(parts, tokens))
    return macs, nonzero


@dataclass
class LayerStats:
    """One row of the summary: a module with parameters of its own."""

    name: str
    kind: str
    params: int
    nonzero_params: int
    macs: int | None = None
    nonzero_macs: int | None = None

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0


@dataclass
class Summary:
    """Per-layer rows and totals; ``str()`` prints a table, :meth:`to_dict` gives plain numbers."""

    layers: list[LayerStats] = field(default_factory=list)
    #: Lines printed under the table (e.g. what a structured sparsity counted).
    notes: list[str] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def nonzero_params(self) -> int:
        return sum(layer.nonzero_params for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of all parameters that are zero."""
        return 1.0 - self.nonzero_params / self.total_params if self.total_params else 0.0

    @property
    def compression(self) -> float:
        """total / non-zero parameters (ShrinkBench's compression ratio)."""
        return self.total_params / self.nonzero_params if self.nonzero_params else float("inf")

    @property
    def attention_macs(self) -> int:
        """MACs of products of two activations (rows of kind :data:`ATTENTION_KIND`); part of :attr:`macs`."""
        return sum(layer.macs or 0 for layer in self.layers if layer.kind == ATTENTION_KIND)

    @property
    def macs(self) -> int:
        return sum(layer.macs or 0 for layer in self.layers)

    @property
    def nonzero_macs(self) -> int:
        return sum(layer.nonzero_macs or 0 for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_params": self.total_params,
            "nonzero_params": self.nonzero_params,
            "sparsity": self.sparsity,
            "compression": self.compression,
            "macs": self.macs,
            "nonzero_macs": self.nonzero_macs,
            "layers": [dict(asdict(layer), sparsity=layer.sparsity) for layer in self.layers],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        header = ("layer", "type", "params", "non-zero", "sparsity", "MACs", "non-zero MACs")
        rows = [
            (
                layer.name or "<root>",
                layer.kind,
                f"{layer.params:,}",
                f"{layer.nonzero_params:,}",
                f"{layer.sparsity:.1%}",
                "-" if layer.macs is None else f"{layer.macs:,}",
                "-" if layer.nonzero_macs is None else f"{layer.nonzero_macs:,}",
            )
            for layer in self.layers
        ]
        total = (
            "total",
            "",
            f"{self.total_params:,}",
            f"{self.nonzero_params:,}",
            f"{self.sparsity:.1%}",
            f"{self.macs:,}",
            f"{self.nonzero_macs:,}",
        )
        widths = [max(len(str(row[i])) for row in [header, *rows, total]) for i in range(len(header))]

        def line(row):
            return "  ".join(
                str(cell).ljust(width) if i < 2 else str(cell).rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths))
            )

        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *map(line, rows), rule, line(total), *self.notes])

    __repr__ = __str__


class _ActivationProducts(TorchFunctionMode):
    """Counts, during one forward pass, the MACs of products of two activations, per module name.

    A torch-function mode sees each call at the Python level, before it is decomposed: one
    ``scaled_dot_product_attention`` call is counted once, by its formula, whatever kernel runs it.
    """

    def __init__(self, weight_storages: set[int], current_module: Callable[[], str]):
        super().__init__()
        self.weight_storages = weight_storages
        self.current_module = current_module
        self.macs: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        macs = self._count(func, args, kwargs, result)
        if macs:
            name = self.current_module()
            self.macs[name] = self.macs.get(name, 0) + macs
        return result

    def _activation(self, value: Any) -> bool:
        """A tensor that is neither a parameter nor a view of one (a weight product is a layer's MACs)."""
        if not isinstance(value, torch.Tensor) or isinstance(value, nn.Parameter):
            return False
        if value.device.type == "meta":
            return True
        if value.layout != torch.strided:  # a sparse weight (prunekit.sparse's CSR/BSR layers): no storage
            return False
        return value.untyped_storage().data_ptr() not in self.weight_storages

    def _weight(self, value: torch.Tensor) -> bool:
        return not self._activation(value)

    def _count(self, func, args, kwargs, result) -> int:
        name = op_name(func)
        # The same decision as the tracer's: which products multiply two activations.
        if not is_activation_product(name, args, kwargs, self._weight):
            return 0
        if name == "scaled_dot_product_attention":
            query = args[0] if args else kwargs.get("query")
            key = args[1] if len(args) > 1 else kwargs.get("key")
            value = args[2] if len(args) > 2 else kwargs.get("value")
            if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
                return 0
            # Scores: each of the L·(batch, heads) queries against S keys over E; then S values of Ev each.
            return math.prod(query.shape[:-1]) * key.shape[-2] * (query.shape[-1] + value.shape[-1])
        if name == "multi_head_attention_forward":
            query, key = args[0], args[1]  # (L, N, E) or unbatched (L, E); projected to E either way
            batch = query.shape[1] if query.ndim == 3 else 1
            return 2 * batch * query.shape[0] * key.shape[0] * query.shape[-1]
        if name == "pruned_multi_head_attention_forward":  # the same, projected to the kept heads' width
            query, key, in_proj_weight = args[0], args[1], args[4]
            width = in_proj_weight.shape[0] // 3 if in_proj_weight is not None else args[17].shape[0]
            batch = query.shape[1] if query.ndim == 3 else 1
            return 2 * batch * query.shape[0] * key.shape[0] * width
        if name == "einsum":
            return self._einsum(args)
        left = matrix_operands(name, args, kwargs)[0]
        if not isinstance(result, torch.Tensor):
            return 0
        return result.numel() * left.shape[-1]  # each output element sums over the shared dimension

    def _einsum(self, args) -> int:
        equation, operands = einsum_operands(args)
        if not isinstance(equation, str) or len(operands) != 2:
            return 0
        inputs = equation.replace(" ", "").split("->")[0].split(",")
        sizes: dict[str, int] = {}
        ellipses = []
        for letters, operand in zip(inputs, operands):
            if "..." in letters:
                before, after = letters.split("...")
                ellipses.append(operand.shape[len(before) : operand.ndim - len(after)])
                letters = before + after
                dims = list(operand.shape[: len(before)]) + list(operand.shape[operand.ndim - len(after) :])
            else:
                dims = list(operand.shape)
            for letter, size in zip(letters, dims):
                sizes[letter] = max(sizes.get(letter, 1), size)  # a size-1 dimension broadcasts
        # One multiply-add per combination of every index, summed or kept.
        return math.prod(sizes.values()) * math.prod(torch.broadcast_shapes(*ellipses) if ellipses else ())


def weight_applications(model: nn.Module, example_inputs: Any) -> dict[nn.Module, int]:
    """``{module: positions}``: how many times each Linear/Conv/Conv1D weight (and each
    nn.MultiheadAttention's projection, counted at the query's tokens) is applied in one forward pass of
    ``example_inputs``; the MACs of :func:`applied_weights` are their elements × positions."""
    return _positions(model, example_inputs)[0]


def _positions(
    model: nn.Module, example_inputs: Any
) -> tuple[dict[nn.Module, int], dict[str, int], dict[nn.Module, int]]:
    """How many times each Linear/Conv/Conv1D weight is applied in one forward pass of ``example_inputs``,
    and the MACs of products of two activations per name of the (innermost) module computing them."""
    counted: dict[nn.Module, int] = {}

    def hook(module, inputs, output):
        if _is_sparse_layer(module):
            counted[module] = counted.get(module, 0) + output.numel() // module.out_features
        else:
            counted[module] = counted.get(module, 0) + applications(module, inputs, output)

    names = {module: name for name, module in model.named_modules()}
    running: list[str] = []

    def enter(module, inputs):
        running.append(names.get(module, ""))

    def leave(module, inputs, output):
        if running:
            running.pop()

    key_tokens: dict[nn.Module, int] = {}

    def attention_hook(module, args, kwargs, output):
        # Its projections and out_proj are applied through functional calls, not as modules: count them
        # here, at the query's tokens (q and out_proj) and the key's (k and v).
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs.get("key", query)
        queries, keys = query.numel() // query.shape[-1], key.numel() // key.shape[-1]
        counted[module] = counted.get(module, 0) + queries
        key_tokens[module] = key_tokens.get(module, 0) + keys
        counted[module.out_proj] = counted.get(module.out_proj, 0) + queries

    handles = [m.register_forward_hook(hook) for m in model.modules() if counts_weight_macs(m) or _is_sparse_layer(m)]
    handles += [
        m.register_forward_hook(attention_hook, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention)
    ]
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    weight_storages = {
        p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta" and p.numel()
    }
    products = _ActivationProducts(weight_storages, lambda: running[-1] if running else "")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), products:
            call_model(model, example_inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return counted, products.macs, key_tokens


def summary(model: nn.Module, example_inputs: Any = None, max_depth: int | None = None) -> Summary:
    """Count parameters, non-zeros and MACs of ``model``, per module and in total.

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs; the model
    runs once on it (in eval mode, without gradients) to learn how often each layer is applied.
    ``max_depth``: one row per module at most this deep (1: the model's children), summing the rows of
    the modules inside it (attention products stay rows of their own); the totals do not change.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if max_depth is not None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
            raise ValueError(
                f"max_depth is a module depth, a whole number >= 1 (1: the model's children), got {max_depth!r}"
            )
        return _grouped(summary(model, example_inputs), model, max_depth)
    positions, products, key_tokens = _positions(model, example_inputs) if example_inputs is not None else ({}, {}, {})
    rows: list[LayerStats] = []
    seen: set[int] = set()
    visited: set[int] = set()

    def walk(name: str, module: nn.Module) -> None:
        # Modules in named_modules() order; a module's attention row after those of its submodules (its
        # q/k/v projections run before the products they feed).
        if id(module) in visited:
            return
        visited.add(id(module))
        rows.extend(_weight_row(name, module, seen, positions, example_inputs))
        if isinstance(module, nn.MultiheadAttention) and module in positions and rows and rows[-1].name == name:
            rows[-1].macs, rows[-1].nonzero_macs = _projection_macs(module, positions[module], key_tokens[module])
        for child_name, child in module.named_children():
            walk(f"{name}.{child_name}" if name else child_name, child)
        if name in products:
            rows.append(LayerStats(name, ATTENTION_KIND, 0, 0, products[name], products[name]))

    walk("", model)
    report = getattr(model, "prunekit_sparse", None)
    return Summary(rows, notes=list(report.notes()) if hasattr(report, "notes") else [])


def _grouped(report: Summary, model: nn.Module, depth: int) -> Summary:
    """``report`` with the rows of modules deeper than ``depth`` summed into their ancestor at ``depth``."""
    groups: dict[tuple[str, bool], LayerStats] = {}
    for row in report.layers:
        prefix = ".".join(row.name.split(".")[:depth])
        attention = row.kind == ATTENTION_KIND
        group = groups.get((prefix, attention))
        if group is None:
            kind = ATTENTION_KIND if attention else type(model.get_submodule(prefix)).__name__
            groups[(prefix, attention)] = LayerStats(
                prefix, kind, row.params, row.nonzero_params, row.macs, row.nonzero_macs
            )
            continue
        group.params += row.params
        group.nonzero_params += row.nonzero_params
        if row.macs is not None:
            group.macs = (group.macs or 0) + row.macs
            group.nonzero_macs = (group.nonzero_macs or 0) + (row.nonzero_macs or 0)
    return Summary(list(groups.values()), list(report.notes))


def _weight_row(
    name: str, module: nn.Module, seen: set[int], positions: dict[nn.Module, int], example_inputs: Any
) -> list[LayerStats]:
    """The row of a module with parameters of its own (not counted in an earlier row), else none. A layer
    whose weight is shared with an earlier row (a language model's output layer tied to the input
    embedding) still computes: it gets a row with its MACs and no parameters."""
    if _is_sparse_layer(module):  # counted as the dense layer it stands for, its kind naming the kernel
        applied = (
            positions.get(module, 0) if example_inputs is not None else int(module.counts_once_without_inputs) or None
        )
        return [LayerStats(name, *module.summary_counts(applied))]
    # A registered layer's weights count as its parameters even when it keeps them as buffers (int8).
    weights = applied_weights(module) if counts_weight_macs(module) else []
    own = list(module.parameters(recurse=False)) + [w for w in weights if not isinstance(w, nn.Parameter)]
    params = [p for p in own if id(p) not in seen]
    if not params and not weights:
        return []
    seen.update(id(p) for p in params)
    total = sum(p.numel() for p in params)
    nonzero = sum(_nonzero(p) for p in params)
    row = LayerStats(name, type(module).__name__, total, nonzero)
    if weights:
        applied = positions.get(module)
        if applied is None and example_inputs is None and linear_like(module):
            applied = 1
        if applied is not None:
            row.macs = sum(w.numel() for w in weights) * applied
            row.nonzero_macs = sum(_nonzero(w) for w in weights) * applied
        elif example_inputs is not None:
            row.macs = row.nonzero_macs = 0  # not reached by this input
    return [row]
