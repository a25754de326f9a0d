"""Magnitude criteria: a weight's importance is its absolute value."""

from __future__ import annotations

from .base import Criterion
from .registry import register_criterion


class Magnitude(Criterion):
    """|w| (Han et al. 2015); units are scored by the L1 norm of their weights."""

    name = "magnitude"
    scores_are_weight_magnitudes = True

    def score(self, target):
        return target.scoring_weight().abs()


class L2Magnitude(Magnitude):
    """|w|; units are scored by the L2 norm of their weights (Li et al. 2017 use the L1 norm of filters)."""

    name = "l2"
    reduce = "l2"


register_criterion("magnitude", Magnitude)
register_criterion("l1", Magnitude)
register_criterion("l2", L2Magnitude)
