"""The unstructured engine: one mask per targeted weight, each layer's units ranked on their own
(local scope, per-layer overrides), all together (global scope), within each output row (row scope),
or within fixed groups (N:M).

It turns the configuration and the criterion's scores into a :class:`~prunekit.engines.update.MaskUpdate`
without touching the model. When the criterion scores exactly |w| per weight and nothing is pruned
yet, it hands the new masks over as magnitude cuts ("|w| > t"), which the enforcement applies in one
fused pass (see :func:`prunekit.core.masks.prune_magnitude`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import cached_property

import torch

from ..core.layers import weight_as_is
from ..core.targets import Target
from ..methods.criteria import Criterion, Custom
from ..methods.granularity import Granularity
from ..methods.schedules import Schedule
from .selection import find_cut, runs_of
from .update import MaskUpdate, ScratchBuffers

#: Where scores are compared (see :class:`UnstructuredEngine`).
SCOPES = ("local", "global", "row")

KeepOf = Callable[[Target], "torch.Tensor | None"]


class UnstructuredEngine:
    """Masks for every target from scores, one layer or one pool of layers at a time.

    Args:
        targets: the weights to prune.
        granularity / criterion: the units and their scores.
        scope: ``"local"`` (every layer to the same sparsity), ``"global"`` (one ranking over all
            layers without an override) or ``"row"`` (every output row of every layer to the same
            sparsity, as Wanda compares scores; Sun et al. 2023).
        min_kept: units every layer keeps (its best), local and global scopes.
        layer_sparsity: ``{target name: final sparsity}`` overrides, each ranked on its own.
        schedule: ramps the overrides at scheduled events.
        keep_of: the target weight's current bool keep-mask, or None when it has none.
    """

    def __init__(
        self,
        targets: list[Target],
        granularity: Granularity,
        criterion: Criterion,
        scope: str,
        min_kept: int,
        layer_sparsity: Mapping[str, float],
        schedule: Schedule,
        keep_of: KeepOf,
    ):
        self.targets, self.granularity, self.criterion = targets, granularity, criterion
        self.scope, self.min_kept, self.layer_sparsity = scope, min_kept, dict(layer_sparsity)
        self.schedule, self.keep_of = schedule, keep_of

    def compute(self, sparsity: float, scheduled_at: int | None) -> MaskUpdate:
        """The masks at ``sparsity`` (overrides ramped to ``scheduled_at``, a step, or final when None).
        Constraints read a magnitude cut through :meth:`MaskUpdate.proposed_keep`, so cuts are always
        handed over as cuts."""
        update = MaskUpdate()
        for layers, layer_sparsity in self.selection_groups(sparsity, scheduled_at):
            if self.granularity.selects_within_groups:
                for target in layers:
                    update.add(target, self._within_groups(target, layer_sparsity), self.granularity.prunes_bias)
            elif self.scope == "row" and layers[0].name not in self.layer_sparsity:
                for target in layers:
                    update.add(target, self._per_row(target, layer_sparsity), self.granularity.prunes_bias)
            else:
                self._ranked(update, layers, layer_sparsity)
        return update

    def selection_groups(self, sparsity: float, scheduled_at: int | None = None) -> list[tuple[list[Target], float]]:
        """Which layers are ranked together, and at which sparsity: each on its own (local and row
        scopes, ``layer_sparsity`` overrides) or all the rest together (global scope). Layers at 0
        are skipped.

        An override is the layer's *final* sparsity: at a scheduled event (``scheduled_at``) the layer
        gets what the schedule asks for at that step with the override as its final value, so an
        iterative or gradual schedule ramps every layer (Han et al. 2015 prune each layer to its own
        ratio over the rounds; Frankle & Carbin 2019 prune the output layer at half the rate)."""
        groups, pool = [], []
        for target in self.targets:
            own = self.layer_sparsity.get(target.name)
            if own is not None and scheduled_at is not None:
                own = self.schedule.sparsity_at(scheduled_at, own, min(self.schedule.initial, own))
            if own is None and self.scope == "global" and not self.granularity.selects_within_groups:
                pool.append(target)
            else:
                groups.append(([target], sparsity if own is None else own))
        if pool:
            groups.append((pool, sparsity))
        return [(layers, value) for layers, value in groups if value > 0]

    # ------------------------------------------------------------------ the three ways of choosing

    def _ranked(self, update: MaskUpdate, layers: list[Target], sparsity: float) -> None:
        sizes = [self.granularity.num_units(t.oik_shape) for t in layers]
        score_fns = [LayerScores(t, self.criterion, self.granularity, self.alive_units(t)) for t in layers]
        cut = find_cut(score_fns, sizes, round(sparsity * sum(sizes)), self.min_kept)
        # Reused buffers for large groups: fresh memory per layer would be page-faulted every time.
        buffers = ScratchBuffers(max(sizes) if sum(sizes) > 1 << 20 else 0)
        for i, target in enumerate(layers):
            signed, above = score_fns[i].signed_scores, cut.keeps_above(i)
            if signed is not None and above is not None and above >= 0:
                update.magnitude_cuts[(target.module, target.param_name, target.full_name)] = (above, cut.protected[i])
                continue
            units = cut.keep(i, score_fns[i](buffers.scores))
            update.add(target, self.granularity.expand(units, target.oik_shape), self.granularity.prunes_bias)

    def _within_groups(self, target: Target, sparsity: float) -> torch.Tensor:
        scores = target.to_oik(self.criterion.score(target).float())
        old = self.keep_of(target)
        if old is not None:
            scores = scores.masked_fill(~target.to_oik(old), -math.inf)
        return self.granularity.keep_within_groups(scores, sparsity)

    def _per_row(self, target: Target, sparsity: float) -> torch.Tensor:
        """Prune round(sparsity × units per row) of every output row's units (ties: the earlier goes)."""
        out_dim = target.oik_shape[0]
        units = LayerScores(target, self.criterion, self.granularity, self.alive_units(target))(None)
        per_row = units.reshape(out_dim, -1)
        keep_units = keep_highest_per_row(per_row, round(sparsity * per_row.shape[1]), self.min_kept)
        return self.granularity.expand(keep_units.reshape(-1), target.oik_shape)

    def alive_units(self, target: Target) -> torch.Tensor | None:
        """Flat bool per unit: True where any weight of the unit is still kept; None if never pruned."""
        keep = self.keep_of(target)
        if keep is None:
            return None
        if self.granularity.is_single_weight:
            return target.to_oik(keep).reshape(-1)
        return self.granularity.unit_scores(target.to_oik(keep.float()), "sum").reshape(-1) > 0


def keep_highest_per_row(scores: torch.Tensor, prune_per_row: int, min_kept: int = 0) -> torch.Tensor:
    """Bool mask of a 2-D score tensor pruning the ``prune_per_row`` lowest entries of every row (at
    most ``columns − min_kept``); among equal scores the earlier column goes first (stable sort)."""
    rows, columns = scores.shape
    prune = max(0, min(prune_per_row, columns - min_kept))
    order = torch.sort(scores, dim=1, stable=True).indices
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, :prune], False)
    return keep


class LayerScores:
    """One target's flat unit scores for :func:`prunekit.engines.selection.find_cut`: already-pruned
    units score −inf, and the tensor returned is the caller's to modify (never a view of the weight)."""

    def __init__(self, target: Target, criterion: Criterion, granularity: Granularity, alive: torch.Tensor | None):
        self.target, self.criterion, self.granularity = target, criterion, granularity
        self.n_units = granularity.num_units(target.oik_shape)
        #: Units are the weights themselves, in the weight's own memory order.
        self.in_weight_order = granularity.is_single_weight and not target.transposed
        self.direct_magnitude = (
            criterion.scores_are_weight_magnitudes
            and self.in_weight_order
            and target.param.dtype.is_floating_point
            and target.handler.scoring_weight is weight_as_is
        )
        self.alive = alive

    @property
    def device(self) -> torch.device:
        """Where the scores are computed: the weight's device."""
        return self.target.param.device

    @cached_property
    def signed_scores(self) -> torch.Tensor | None:
        """The flat float32 weight when the scores are exactly its absolute values (magnitude per
        weight, none pruned yet), which lets selection and masking use fused ops on it; else None."""
        param = self.target.param
        if not self.direct_magnitude or self.alive is not None or param.dtype != torch.float32:
            return None
        if not param.is_contiguous():  # pruning it in place goes through its flat view
            return None
        return param.detach().reshape(-1)

    def __call__(self, out: torch.Tensor | None) -> torch.Tensor:
        if self.direct_magnitude:
            flat = self.target.param.detach().reshape(-1)
            usable = out is not None and out.device == flat.device and flat.dtype == torch.float32
            units = torch.abs(flat, out=out[: self.n_units]) if usable else flat.abs().float()
        else:
            element = self.criterion.score(self.target)
            if isinstance(self.criterion, Custom):
                element = element.clone()
            if not self.criterion.scores_are_weight_magnitudes and torch.isnan(element).any():
                raise ValueError(f"criterion {self.criterion.name!r} gave NaN scores for {self.target.full_name}")
            units = self.granularity.unit_scores(self.target.to_oik(element.float()), self.criterion.reduce)
            units = units.reshape(-1)
        if self.alive is not None:
            units.masked_fill_(~self.alive, -math.inf)
        return units

    def runs(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """Scores of the ``length`` consecutive units from each of these flat positions, run after run."""
        if not self.direct_magnitude:
            return runs_of(self(None), starts, length)
        units = runs_of(self.target.param.detach().reshape(-1), starts, length).abs().float()
        if self.alive is not None:
            units.masked_fill_(~runs_of(self.alive, starts, length), -math.inf)
        return units
