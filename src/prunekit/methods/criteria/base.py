"""Criteria: how important each weight is. Higher score = more worth keeping.

A criterion gives one score per weight (the weight's shape); the granularity then reduces the scores
of a unit with the criterion's ``reduce`` norm ("sum", i.e. the L1 norm of non-negative scores, or
"l2").

==============  =============================================================  ==================================
name            score of weight w                                              source
==============  =============================================================  ==================================
``magnitude``   \\|w\\| (units: L1 norm of the group)                            Han et al. 2015
``l2``          \\|w\\| (units: L2 norm of the group)                            Li et al. 2017 (filters by norm)
``gradient``    \\|Σ_b w·∂L_b/∂w\\|, first-order Taylor estimate of the loss     Molchanov et al. 2017/2019;
                change when w is removed, summed over batches b                  ShrinkBench's gradient magnitude
``movement``    −Σ_t w_t·∂L_t/∂w accumulated over training steps t: weights    Sanh, Wolf & Rush 2020
                moving away from zero score high
``random``      uniform in [0, 1), from a seeded generator                     baseline
a callable      ``fn(weight, module) -> Tensor`` (or ``fn(weight)``)           yours
==============  =============================================================  ==================================

Add your own in one file: subclass :class:`Criterion` and register it by name with
:func:`register_criterion` (or the ``@register_criterion("name")`` decorator); ``pk.prune(...,
criterion="name")`` then finds it. A criterion that needs calibration statistics (per-input-channel
activation norms, X·Xᵀ) lists them in ``statistics``; the pruner collects them from ``calibration=``
batches in one shared pass (:mod:`prunekit.engines.calibration`) and hands them over through
:meth:`Criterion.use_statistics` before scoring.

``gradient`` and ``movement`` need gradients. Either pass the batches and the loss explicitly
(``data=`` an iterable of ``(inputs, targets)`` or dict batches, ``loss_fn=loss_fn(outputs, targets)``),
or use them in a :class:`~prunekit.Pruner` during training, where they accumulate the gradients of
your own backward passes. With neither, they raise a ``ValueError`` instead of pruning at random.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...core.targets import Target

#: Options a criterion may take, as the pruner passes them (see :attr:`Criterion.options`).
OPTIONS = ("data", "loss_fn", "seed")


class Criterion:
    """Base class for criteria; subclass and override :meth:`score` for your own.

    Class attributes a subclass may set:

    - ``name``: the name it is registered under.
    - ``reduce``: how a unit's score is formed from its members' scores, ``"sum"`` or ``"l2"``.
    - ``options``: which of the pruner's options (``data``, ``loss_fn``, ``seed``) its constructor
      takes; passing another one to the pruner is an error, never silently ignored.
    - ``scores_are_weight_magnitudes``: ``score(target)`` is exactly ``|w|``, which lets the engines
      use fused magnitude passes instead of calling :meth:`score`.
    - ``needs_gradients``: scores come from ∂L/∂w, so a frozen weight (``requires_grad=False``)
      cannot be scored.
    - ``statistics``: names of the calibration statistics it reads (see
      :data:`prunekit.engines.calibration.STATISTICS`), collected from ``calibration=`` batches.
    """

    name = "criterion"
    reduce = "sum"
    options: tuple[str, ...] = ()
    scores_are_weight_magnitudes = False
    needs_gradients = False
    statistics: tuple[str, ...] = ()

    def prepare(self, model: nn.Module, targets: list[Target]) -> None:
        """Called once before every pruning event, before any score is asked for."""

    def score(self, target: Target) -> torch.Tensor:
        """Scores of ``target``'s weights, a float tensor of the weight's shape."""
        raise NotImplementedError

    def has_statistics(self) -> bool:
        """Whether the criterion already holds the statistics it reads (then no ``calibration=`` is needed)."""
        return False

    def use_statistics(self, statistics: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Receive ``{target full name: {statistic name: tensor}}`` before :meth:`prepare` (only
        called for criteria that list ``statistics``)."""
        self.calibration_statistics = statistics

    def finish(self) -> None:
        """Called after every pruning event."""

    def observe(self, targets: list[Target]) -> list[Any]:
        """Start watching training (backward hooks); return removable handles."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raise ``ValueError`` before changing anything if it is invalid."""

    def __repr__(self) -> str:
        return repr(self.name)
