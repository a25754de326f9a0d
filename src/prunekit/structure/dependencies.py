"""Dependency groups: which slices of which parameters must be removed together.

:func:`trace_dependencies` runs the model once on example inputs (see :mod:`prunekit.structure.trace`)
and returns :class:`ChannelDependencies`: the *units* of structured pruning. A unit is one coupled set
of channels, e.g. channel 7 of a ResNet stage's residual stream: filter 7 of every conv that writes
into that stream, the matching BatchNorm entries, and input channel 7 of every conv that reads it.
Pruning a unit zeroes (and :func:`prunekit.compact` removes) every index in it, and nothing else, so
the masked model computes exactly what the compacted one will.

Units come in *families*: the units created by the same layer output (one family per conv's
filters, per attention module's heads, ...). ``scope="local"`` prunes every family to the same
fraction; ``scope="global"`` ranks all units together.

By default nothing that reaches a model output is removable (a classifier keeps its classes, an
encoder its hidden size): pass ``prune_outputs=True`` to allow it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..core.layers import handler_for
from ..core.masks import MASK_PREFIX
from ..core.targets import LayerSelector, selector_list, selector_matches
from .channels import DimRange
from .forward import run_traced
from .labels import broadcast_dims, ids_of, narrow_first, unbroadcast
from .threads import one_thread
from .tracer import ChannelTracer


@dataclass(eq=False)
class Slice:
    """One dimension of one parameter or buffer that units cut: ``unit[i]`` is the unit index i belongs
    to (−1 where index i is never removed)."""

    module: nn.Module
    module_name: str
    tensor_name: str
    dim: int
    unit: torch.Tensor
    producer: bool
    consumer: bool = False

    @property
    def full_name(self) -> str:
        return f"{self.module_name}.{self.tensor_name}" if self.module_name else self.tensor_name

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.tensor_name)

    @property
    def maskable(self) -> bool:
        """Whether pruning masks this tensor: a parameter, or a buffer its layer handler names as a
        weight (a quantized layer's int8 weight). Other buffers (running statistics) are only sliced."""
        if self.tensor_name in self.module._parameters:
            return True
        handler = handler_for(self.module)
        return handler is not None and self.tensor_name in handler.weights

    def removed(self, pruned_units: torch.Tensor) -> torch.Tensor:
        """Bool per index of this dimension: True where the index belongs to a pruned unit."""
        return Slice.removed_of(pruned_units, self.unit)

    @staticmethod
    def removed_of(pruned_units: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """Bool per entry of ``unit`` (unit indices, −1 for none): True where that unit is pruned."""
        if not pruned_units.numel():
            return torch.zeros(unit.shape, dtype=torch.bool)
        # index_select and a mask rather than boolean-mask indexing, which costs several times more.
        return pruned_units.index_select(0, unit.clamp(min=0)) & (unit >= 0)


class ChannelDependencies:
    """The units of structured pruning of one model (see the module docstring)."""

    def __init__(
        self,
        slices: list[Slice],
        num_units: int,
        unit_family: torch.Tensor,
        families: list[str],
        unit_is_head: torch.Tensor | None = None,
        unit_read_out: torch.Tensor | None = None,
    ):
        self.slices = slices
        self.num_units = num_units
        self.unit_family = unit_family
        self.families = families
        #: Bool per unit: an attention head (coupled by an activation × activation product such as
        #: q·kᵀ or softmax·v), as opposed to a channel / neuron of the model's width.
        self.unit_is_head = torch.zeros(num_units, dtype=torch.bool) if unit_is_head is None else unit_is_head
        #: Bool per unit: its channels are not zero when it is pruned, only the layer columns that read them
        #: are (a query head of multi-query attention, which still averages the kept values): it counts as
        #: removed only once those columns are zero too (see :func:`prunekit.structure.units.removed_units`).
        self.unit_read_out = torch.zeros(num_units, dtype=torch.bool) if unit_read_out is None else unit_read_out

    def members(self, unit: int) -> dict[str, dict[int, list[int]]]:
        """``{tensor name: {dim: [indices]}}`` of one unit, for inspection."""
        found: dict[str, dict[int, list[int]]] = {}
        for piece in self.slices:
            where = torch.nonzero(piece.unit == unit).reshape(-1).tolist()
            if where:
                found.setdefault(piece.full_name, {})[piece.dim] = where
        return found

    def __len__(self) -> int:
        return self.num_units

    def __repr__(self) -> str:
        return (
            f"ChannelDependencies({self.num_units} removable units ({int(self.unit_is_head.sum())} attention heads) "
            f"in {len(self.families)} families, "
            f"cutting {len(self.slices)} tensor dimensions)"
        )


def trace_dependencies(
    model: nn.Module,
    example_inputs: Any,
    *,
    exclude: LayerSelector | Iterable[LayerSelector] | None = None,
    prune_outputs: bool = False,
    reuse: bool = True,
) -> ChannelDependencies:
    """Trace ``model`` on ``example_inputs`` and return its units of structured pruning.

    ``exclude`` (module types or name patterns, as for :class:`prunekit.Pruner`) lists modules to leave
    exactly as they are: their inputs and outputs keep every channel, and operations inside them need
    no support from prunekit. With ``reuse`` (default) the last trace of the same model is returned
    when no module, parameter, buffer, input shape or option has changed since (so pruning and then
    compacting traces once). The model is run in eval mode without gradients and left unchanged
    (its train/eval flags are restored): on meta copies of its float inputs, which computes nothing,
    and for real only when its forward reads values (see :mod:`.forward`). Raises
    :class:`UnsupportedOperationError` naming the operation and module when channels cannot be followed
    through some operation.
    """
    return trace_with_output(model, example_inputs, exclude, prune_outputs, reuse)[0]


def trace_with_output(
    model: nn.Module,
    example_inputs: Any,
    exclude: Any = None,
    prune_outputs: bool = False,
    reuse: bool = True,
    *,
    inherit_options: bool = False,
) -> tuple[ChannelDependencies, Any]:
    """:func:`trace_dependencies`, and the model's output on ``example_inputs`` (eval mode, no gradients)
    when this call ran the model for real, None when it returned the cached trace or traced shapes only:
    :func:`prunekit.compact` checks its result against that output instead of running the model once more.

    ``inherit_options``: when no ``exclude`` and no ``prune_outputs`` are given, the cached trace of the
    unchanged model is returned whatever options it was made with (compaction after pruning then
    follows the pruner's ``exclude=`` and ``prune_outputs=`` without their being repeated)."""
    if example_inputs is None:
        raise ValueError(
            "structured pruning needs example_inputs (a tensor, tuple or dict the model accepts) to trace "
            "which channels are coupled, e.g. example_inputs=torch.randn(1, 3, 224, 224)"
        )
    selectors = selector_list(exclude, "exclude")
    named = list(model.named_modules()) if selectors else []
    for selector in selectors:  # a typo would otherwise leave the module it meant pruned
        if not any(name and selector_matches(selector, name, module) for name, module in named):
            shown = selector.__name__ if isinstance(selector, type) else repr(selector)
            raise ValueError(f"exclude entry {shown} matches no module of the model; fix or remove it")
    excluded = [
        module
        for name, module in named
        if name and any(selector_matches(selector, name, module) for selector in selectors)
    ]
    key = _signature(model, example_inputs, excluded, prune_outputs)
    cached = _CACHE.get(model) if reuse else None
    if cached is not None and cached[0] == key:
        return cached[1], None
    if cached is not None and inherit_options and not selectors and not prune_outputs:
        _, _, cached_excluded, cached_prune_outputs = cached
        if cached[0] == _signature(model, example_inputs, cached_excluded, cached_prune_outputs):
            return cached[1], None
    tracer, output = run_traced(model, example_inputs, excluded, prune_outputs)
    with one_thread():
        dependencies = _units(model, tracer)
    # A cached value must not hold the model itself, or the weak key would never be released.
    if all(piece.module is not model for piece in dependencies.slices):
        _CACHE[model] = (key, dependencies, excluded, prune_outputs)
    return dependencies, output


# The last trace of each model, reused while nothing it depends on has changed (pruning and then
# compacting the same model traces it once).
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(model: nn.Module, example_inputs: Any, excluded: list[nn.Module], prune_outputs: bool) -> tuple:
    """What a trace depends on: every module and tensor (identity and shape), the inputs' shapes and
    dtypes, the excluded modules and the outputs option. prunekit's own mask buffers are left out:
    pruning adds them without changing how channels couple, so prune-then-compact traces once."""
    named = list(model.named_modules(remove_duplicate=False))  # one walk of the model for all three
    tensors = tuple(
        (name, kind, tensor_name, id(tensor), tuple(tensor.shape))
        for name, module in named
        for kind, members in (("p", module._parameters), ("b", module._buffers))
        for tensor_name, tensor in members.items()
        if tensor is not None and not tensor_name.startswith(MASK_PREFIX)
    )
    modules = tuple((name, id(module)) for name, module in named)
    inputs = tuple(
        (tuple(leaf.shape), leaf.dtype, str(leaf.device)) if isinstance(leaf, torch.Tensor) else repr(leaf)
        for leaf in pytree.tree_leaves(example_inputs)
    )
    return tensors, modules, inputs, tuple(id(m) for m in excluded), bool(prune_outputs)


def _misfits(root: torch.Tensor, label: torch.Tensor, outer: tuple[int, ...], inner: tuple[int, ...]) -> torch.Tensor:
    """Roots of the units that neither fill whole inner rows nor the same inner positions of every outer row."""
    rest = [d for d in range(label.ndim) if d not in outer and d not in inner]
    # Rows repeated along a broadcast dimension (tokens, batch) give the same positions: one is enough.
    label = narrow_first(label, [d for d in broadcast_dims(label) if d in rest])
    outer_size = math.prod(label.shape[d] for d in outer)
    inner_size = math.prod(label.shape[d] for d in inner)
    grid = label.permute(*rest, *outer, *inner).reshape(-1, outer_size, inner_size)
    roots = _roots_of(root, grid)
    outer_index = torch.arange(outer_size).reshape(1, -1, 1).expand_as(roots)
    inner_index = torch.arange(inner_size).reshape(1, 1, -1).expand_as(roots)
    present = roots > 0
    # One int64 key per (unit, outer, inner) position keeps the deduplication a fast 1-D unique.
    keys = torch.unique((roots[present] * outer_size + outer_index[present]) * inner_size + inner_index[present])
    if not keys.numel():
        return keys
    unit, inner_at = keys // inner_size, keys % inner_size
    unit_root = unit // outer_size
    rows, row_counts = torch.unique(unit, return_counts=True)
    columns, column_counts = torch.unique(unit_root * inner_size + inner_at, return_counts=True)
    bad_rows = torch.unique(rows[row_counts != inner_size] // outer_size)
    bad_columns = torch.unique(columns[column_counts != outer_size] // inner_size)
    return bad_rows[torch.isin(bad_rows, bad_columns)]


def _roots_of(root: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The component root of every element of a label tensor (−1 for plain data), same shape."""
    ids = ids_of(label)
    roots = root.index_select(0, ids.clamp(min=0).reshape(-1)).reshape(ids.shape)
    return roots.masked_fill_(ids < 0, -1)


def _partial_roots(root: torch.Tensor, label: torch.Tensor, dim: int) -> torch.Tensor:
    """Roots of the units that fill only some positions of dimension ``dim`` of a label tensor."""
    label = narrow_first(label, [d for d in broadcast_dims(label) if d != dim])
    positions = _roots_of(root, label).movedim(dim, 0)
    size = positions.shape[0]
    per_position = positions.reshape(size, -1)
    where = torch.arange(size).reshape(size, 1).expand_as(per_position)
    valid = per_position >= 0
    keys = torch.unique(per_position[valid] * size + where[valid])
    roots, counts = torch.unique(keys // size, return_counts=True)
    return roots[counts < size]


def _units(model: nn.Module, tracer: ChannelTracer) -> ChannelDependencies:
    graph = tracer.graph
    root = graph.components()
    # Ranges hold consecutive ids from 1 on, in allocation order, so per-range facts reach their ids by
    # indexing with range_of_id (id 0, PINNED, gets an index of its own): whole-vector operations instead
    # of a loop over the ranges. Scatters and index_select rather than boolean-mask or tensor indexing
    # (x[mask], x[index]), which are many times slower on CPU.
    ranges = graph.ranges
    sizes = torch.tensor([r.size for r in ranges], dtype=torch.int64)
    range_of_id = torch.cat([torch.full((1,), len(ranges)), torch.arange(len(ranges)).repeat_interleave(sizes)])
    is_producer = torch.tensor([r.producer for r in ranges] + [False])
    producer_id = is_producer.index_select(0, range_of_id)
    producer_root = torch.zeros(graph.size, dtype=torch.uint8).scatter_reduce_(0, root, producer_id.byte(), "amax")
    removable = producer_root.bool().index_select(0, root) & (root != 0)
    # Selections by constant position (x[:, :k]) stay valid only for units that fill the whole dimension.
    # A reshape that splits a dimension (outer × inner) stays valid only for units that fill whole inner
    # rows (heads: the outer count shrinks) or the same inner positions in every outer row (channel
    # shuffle groups: the inner size shrinks). Misfits are collected per root, then dropped in one pass.
    misfit = torch.zeros(graph.size, dtype=torch.bool)
    for label, dim in tracer.positional:
        misfit[_partial_roots(root, label, dim)] = True
    for label, outer, inner in tracer.splits:
        misfit[_misfits(root, label, outer, inner)] = True
    # Heads split in a module whose head count compaction cannot update stay (they would leave the
    # module reshaping to its old head count).
    if tracer.fixed_head_splits:
        head_root = torch.zeros(graph.size, dtype=torch.bool)
        for head_ids in tracer.heads:
            head_root[root.index_select(0, head_ids[head_ids >= 0])] = True
        for label in tracer.fixed_head_splits:
            roots = _roots_of(root, unbroadcast(label)).reshape(-1)
            roots = roots[roots > 0]
            misfit[roots[head_root.index_select(0, roots)]] = True
    removable &= ~misfit.index_select(0, root)
    removable[0] = False
    # Units are numbered by their root (the smallest id in them): a running count over the roots in use
    # (what torch.unique(..., return_inverse=True) gives, without sorting every id).
    used_root = torch.zeros(graph.size, dtype=torch.uint8).scatter_reduce_(0, root, removable.byte(), "amax")
    unit_of_root = torch.cumsum(used_root, dim=0) - 1
    unit = torch.where(removable, unit_of_root.index_select(0, root), -1)
    num_units = int(used_root.sum())

    # A unit's family is the first layer output (in trace order) that produces it.
    producers: list[DimRange] = [r for r in ranges if r.producer]
    producer_index = torch.full((len(ranges) + 1,), len(ranges), dtype=torch.int64)
    producer_index[is_producer] = torch.arange(len(producers))
    # Ids that produce no unit go to a spare last slot.
    produced = producer_id & (unit >= 0)
    family = torch.full((num_units + 1,), len(ranges), dtype=torch.int64)
    family_of_id = producer_index.index_select(0, range_of_id)
    family.scatter_reduce_(0, torch.where(produced, unit, num_units), family_of_id, reduce="amin")
    used, unit_family = torch.unique(family[:num_units], return_inverse=True)
    families = [producers[i].tensor_name for i in used.tolist()]

    slices = []
    modules = dict(tracer.named_modules)
    has_unit = (unit >= 0).byte()
    range_has_unit = torch.zeros(len(ranges) + 1, dtype=torch.uint8).scatter_reduce_(0, range_of_id, has_unit, "amax")
    for dim_range, has_unit in zip(ranges, range_has_unit.tolist()):
        units = unit[dim_range.start : dim_range.start + dim_range.size].clone()
        if has_unit:
            module = modules[dim_range.owner]
            slices.append(
                Slice(
                    module,
                    dim_range.owner,
                    dim_range.tensor,
                    dim_range.dim,
                    units,
                    dim_range.producer,
                    dim_range.consumer,
                )
            )
    unit_is_head = torch.zeros(num_units, dtype=torch.bool)
    for head_ids in tracer.heads:
        heads = unit[head_ids[head_ids >= 0]]  # −1: a head row with no channel (plain data), not the last id
        unit_is_head[heads[heads >= 0]] = True
    unit_read_out = torch.zeros(num_units, dtype=torch.bool)
    for head_ids in tracer.read_out_heads:
        heads = unit[head_ids[head_ids >= 0]]
        unit_read_out[heads[heads >= 0]] = True
    return ChannelDependencies(slices, num_units, unit_family, families, unit_is_head, unit_read_out)
