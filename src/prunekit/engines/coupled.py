"""The coupled engine: structured pruning of whole dependency groups (see :mod:`prunekit.structure`).

Every unit is a set of channels coupled across layers (a residual stream's channel, a head, an MLP
neuron); pruning it masks every parameter slice that writes or reads it. The engine scores units from
the criterion's element scores (:func:`prunekit.structure.units.unit_scores`), chooses them
(:func:`prunekit.structure.units.choose_units`, or the fewest that save a fraction of parameters or
MACs, :func:`prunekit.structure.cost.search_sparsity`) and returns the masks; it never touches the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..core import masks as mask_store
from ..core.config import StructuredOptions
from ..core.targets import Target, check_sparsity, name_matches, preview_names
from ..methods.criteria import Criterion
from ..methods.schedules import Schedule
from ..structure.cost import UnitCosts, search_sparsity
from ..structure.dependencies import ChannelDependencies
from ..structure.units import choose_units, removed_units, unit_keep_factors, unit_scores
from .update import MaskUpdate


class CoupledEngine:
    """Masks of whole dependency groups.

    Args:
        dependencies: the traced units.
        targets: the weights the pruner targets (their element scores score the units).
        criterion / scope / schedule / min_kept: as for the pruner.
        options: the structured options (round_to, max_layer_sparsity, sparsity_in, prune_only, ...).
        layer_sparsity: ``{pattern: final sparsity}``, matched against the module producing each family.
        left_out: full names of prunable weights that ``include=`` leaves out: units they produce stay.
        maskable: ``{parameter full name: (module, parameter name)}`` of every parameter in a unit.
        cost_model: builds the :class:`~prunekit.structure.cost.UnitCosts` when ``sparsity_in`` is
            "params" or "macs" (called once, lazily: MACs need a forward pass).
    """

    def __init__(
        self,
        dependencies: ChannelDependencies,
        targets: list[Target],
        criterion: Criterion,
        scope: str,
        schedule: Schedule,
        min_kept: int,
        options: StructuredOptions,
        layer_sparsity: Mapping[str, float],
        left_out: set[str],
        maskable: Mapping[str, tuple[nn.Module, str]],
        cost_model: Callable[[], UnitCosts],
    ):
        self.dependencies, self.targets, self.criterion = dependencies, targets, criterion
        self.scope, self.schedule, self.min_kept, self.options = scope, schedule, min_kept, options
        self.family_sparsity = self._resolve_family_sparsity(layer_sparsity)
        self.maskable, self._cost_model, self._costs = maskable, cost_model, None
        self.allowed = self._allowed_units(left_out)
        if options.prune_only == "heads" and not bool((dependencies.unit_is_head & self.allowed).any()):
            raise ValueError(
                "prune_only='heads', but this model has no attention heads that can be removed "
                "(none found, or all of them reach an output or an excluded module); use prune_only=None"
            )

    def _allowed_units(self, left_out: set[str]) -> torch.Tensor:
        """Units this pruner may remove: of the kind ``prune_only`` names, and produced only by
        targeted weights (a unit written by a weight that ``include=`` leaves out stays)."""
        deps = self.dependencies
        allowed = torch.ones(deps.num_units, dtype=torch.bool)
        if self.options.prune_only is not None:
            allowed = deps.unit_is_head.clone() if self.options.prune_only == "heads" else ~deps.unit_is_head
        if left_out:
            for piece in deps.slices:
                if piece.producer and piece.full_name in left_out:
                    written = piece.unit[piece.unit >= 0]
                    allowed[written] = False
        return allowed

    def _resolve_family_sparsity(self, overrides: Mapping[str, float]) -> dict[int, float]:
        """layer_sparsity patterns, matched against the module producing each family of units."""
        found: dict[int, float] = {}
        used = set()
        for index, name in enumerate(self.dependencies.families):
            module_name = name.rpartition(".")[0]
            for pattern, value in overrides.items():
                if name_matches(pattern, module_name):
                    found[index] = check_sparsity(value, f"layer_sparsity[{pattern!r}]")
                    used.add(pattern)
                    break
        unused = [p for p in overrides if p not in used]
        if unused:
            raise ValueError(
                f"layer_sparsity patterns {unused} match no layer whose channels can be pruned; "
                f"the layers producing prunable channels are: {preview_names(self.dependencies.families)}"
            )
        return found

    def costs(self) -> UnitCosts:
        """Parameter and MAC counts per set of removed units, built once."""
        if self._costs is None:
            self._costs = self._cost_model()
        return self._costs

    def compute(self, sparsity: float, scheduled_at: int | None = None) -> MaskUpdate:
        """Masks for ``sparsity`` (overrides ramped to ``scheduled_at``, a step; final when None)."""
        deps, options = self.dependencies, self.options
        by_name = {t.full_name: t for t in self.targets}
        if self.criterion.scores_are_weight_magnitudes and self.criterion.reduce == "l2":
            # Squares of |w| are squares of w: the L2 norms need no |w| copy of every weight.
            element_scores = {name: (lambda t=t: t.scoring_weight()) for name, t in by_name.items()}
        else:
            element_scores = {name: (lambda t=t: self.criterion.score(t)) for name, t in by_name.items()}
        # Magnitude scores also show which units have a non-zero filter: those need no zero test below.
        nonzero = torch.zeros(deps.num_units, dtype=torch.bool) if self.criterion.scores_are_weight_magnitudes else None
        scores = unit_scores(deps, element_scores, self.criterion.reduce, nonzero)
        if torch.isnan(scores).any():
            raise ValueError(f"criterion {self.criterion.name!r} gave NaN scores")
        num_families = len(deps.families)
        pooled = torch.full((num_families,), self.scope == "global", dtype=torch.bool)
        overrides = {}
        for index, value in self.family_sparsity.items():
            if scheduled_at is not None:  # an override is the family's final sparsity, ramped by the schedule
                value = self.schedule.sparsity_at(scheduled_at, value, min(self.schedule.initial, value))
            overrides[index], pooled[index] = value, False
        already = removed_units(deps, nonzero_units=nonzero)
        allowed = self.allowed
        limits = (self.min_kept, options.round_to, options.max_layer_sparsity)

        def choose(unit_sparsity: float) -> torch.Tensor:
            family_sparsity = torch.full((num_families,), float(unit_sparsity), dtype=torch.float64)
            for index, value in overrides.items():
                family_sparsity[index] = value
            if bool(allowed.all()):
                return choose_units(scores, deps.unit_family, family_sparsity, pooled, already, *limits)
            # Rank only the allowed units; the others keep their state (pruned only if already pruned).
            pruned = already.clone()
            pruned[allowed] = choose_units(
                scores[allowed], deps.unit_family[allowed], family_sparsity, pooled, already[allowed], *limits
            )
            return pruned

        if options.sparsity_in == "channels":
            pruned = choose(sparsity)
        else:
            costs = self.costs()
            pruned = search_sparsity(choose, lambda units: costs.removed_fraction(units, options.sparsity_in), sparsity)
        update = MaskUpdate()
        for full_name, dims in unit_keep_factors(deps, pruned).items():
            module, param_name = self.maskable[full_name]
            update.add_separable(
                module, param_name, full_name, mask_store.SeparableMask(getattr(module, param_name).shape, dims)
            )
        return update
