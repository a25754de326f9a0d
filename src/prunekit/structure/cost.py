"""What removing units costs and saves: parameters and MACs left after structured pruning.

Removing a unit cuts index ``i`` out of every dimension it spans, so a parameter keeps
``∏_d (size_d − removed_d)`` of its elements: a conv between two layers pruned by a channel fraction p
keeps (1 − p)² of its weights, which is why a channel ratio p removes about 1 − (1 − p)² of a plain
conv stack's parameters. :class:`UnitCosts` counts this exactly for any set of pruned units, so that
:class:`prunekit.Pruner` can aim at a fraction of parameters or of MACs instead of a fraction of units
(``sparsity_in="params"`` / ``"macs"``).

MACs are the weight MACs :func:`prunekit.summary` counts (Conv, Linear, Hugging Face Conv1D): each
weight element once per position it is applied at in one forward pass of the example inputs, so a
layer keeps the same fraction of its MACs as of its weight. An nn.MultiheadAttention's projections count
at the query's tokens (exact for self-attention; for cross-attention with another key length the key
and value rows are counted at the query's length). Products of two activations (attention scores, which
the summary reports in rows of their own) are not part of this count.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .dependencies import ChannelDependencies
from .layer_weights import applied_weights

#: What a structured sparsity can count: units (coupled channels / heads), parameters or MACs.
MEASURES = ("channels", "params", "macs")


class UnitCosts:
    """Parameters and MACs kept by a model when a given set of units is removed.

    Args:
        model: the model the dependencies were traced on.
        dependencies: its units (:func:`prunekit.structure.trace_dependencies`).
        applied: ``{module: positions}``, how often each weight is applied in one forward pass
            (:func:`prunekit.summary.weight_applications`); needed for MACs only.
    """

    def __init__(
        self, model: nn.Module, dependencies: ChannelDependencies, applied: dict[nn.Module, int] | None = None
    ):
        cut: dict[int, dict[int, list[torch.Tensor]]] = {}
        shapes: dict[int, tuple[int, ...]] = {}
        uses: dict[int, int] = {}
        for piece in dependencies.slices:
            if not piece.maskable:
                continue  # buffers (running statistics) are not parameters
            param = piece.tensor
            shapes[id(param)] = tuple(param.shape)
            cut.setdefault(id(param), {}).setdefault(piece.dim, []).append(piece.unit)
        for module, positions in (applied or {}).items():
            for weight in applied_weights(module):
                uses[id(weight)] = uses.get(id(weight), 0) + positions
                shapes.setdefault(id(weight), tuple(weight.shape))
        # Parameters, and the buffers registered layers keep their weights in (int8), as the summary counts.
        unique = {id(p): p for p in model.parameters()}
        unique.update({id(w): w for m in model.modules() for w in applied_weights(m) if id(w) not in unique})
        #: Parameters no unit touches, counted once.
        self._fixed_params = sum(p.numel() for key, p in unique.items() if key not in cut)
        self.total_params = sum(p.numel() for p in unique.values())
        self.total_macs = sum(math.prod(shapes[key]) * count for key, count in uses.items())
        self._fixed_macs = sum(math.prod(shapes[key]) * count for key, count in uses.items() if key not in cut)
        # Vectorised layout, so one evaluation is a few tensor ops however many layers there are: row r
        # of a [cut parameters × max cut dims] table holds, per cut dimension, its full length; the
        # product of every uncut dimension is a separate factor per parameter.
        keys = list(cut)
        width = max((len(dims) for dims in cut.values()), default=1)
        self._lengths = torch.ones(len(keys), width, dtype=torch.int64)
        self._uncut = torch.ones(len(keys), dtype=torch.int64)
        self._uses = torch.tensor([uses.get(key, 0) for key in keys], dtype=torch.int64)
        units, cells = [], []
        for row, key in enumerate(keys):
            dims = cut[key]
            shape = shapes[key]
            self._uncut[row] = math.prod(length for dim, length in enumerate(shape) if dim not in dims)
            for column, (dim, pieces) in enumerate(sorted(dims.items())):
                self._lengths[row, column] = shape[dim]
                unit = _merge(pieces)
                unit = unit[unit >= 0]
                units.append(unit)
                cells.append(torch.full_like(unit, row * width + column))
        self._units = torch.cat(units) if units else torch.zeros(0, dtype=torch.int64)
        self._cells = torch.cat(cells) if cells else torch.zeros(0, dtype=torch.int64)

    def kept(self, pruned: torch.Tensor) -> tuple[int, int]:
        """(parameters, MACs) left when the units marked True in ``pruned`` are removed."""
        removed = torch.zeros(self._lengths.numel(), dtype=torch.int64)
        removed.index_add_(0, self._cells, pruned[self._units].long())
        per_param = (self._lengths - removed.reshape(self._lengths.shape)).prod(dim=1) * self._uncut
        params = self._fixed_params + int(per_param.sum())
        macs = self._fixed_macs + int((per_param * self._uses).sum())
        return params, macs

    def removed_fraction(self, pruned: torch.Tensor, measure: str) -> float:
        """Fraction of the model's parameters or MACs (``measure``) that removing ``pruned`` saves."""
        params, macs = self.kept(pruned)
        if measure == "params":
            return 1.0 - params / self.total_params if self.total_params else 0.0
        if measure == "macs":
            return 1.0 - macs / self.total_macs if self.total_macs else 0.0
        raise ValueError(f"unknown measure {measure!r}; valid measures are 'params' and 'macs'")


def _merge(units: list[torch.Tensor]) -> torch.Tensor:
    """One unit per index from several slices of the same dimension (they agree where both cut)."""
    merged = units[0].clone()
    for other in units[1:]:
        merged = torch.where(merged >= 0, merged, other)
    return merged


def search_sparsity(
    choose: Callable[[float], torch.Tensor],
    removed_fraction: Callable[[torch.Tensor], float],
    goal: float,
    iterations: int = 40,
) -> torch.Tensor:
    """The pruned units of the smallest unit sparsity whose removal saves at least ``goal`` (a fraction).

    ``choose(s)`` returns the pruned units for a unit sparsity ``s`` in [0, 1); the savings grow with
    ``s`` (a larger sparsity prunes a superset), so bisection finds the smallest ``s`` reaching the goal.
    When no sparsity below 1 reaches it (every layer keeps ``min_kept`` units), the largest is used.
    """
    low, high = 0.0, 1.0 - 1e-9
    best = choose(high)
    if removed_fraction(best) < goal:
        return best
    for _ in range(iterations):
        middle = (low + high) / 2
        pruned = choose(middle)
        if removed_fraction(pruned) >= goal:
            high, best = middle, pruned
        else:
            low = middle
    return best
