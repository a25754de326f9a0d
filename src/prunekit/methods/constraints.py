"""Constraints: limits every mask must meet, applied after selection.

A constraint is a small class with one method, :meth:`Constraint.allow`, from the mask selection
proposes for one weight to the mask it allows (a subset: constraints only prune more). The engine
(:mod:`prunekit.engines.constraints`) calls it for every target at every pruning event, with the
criterion's scores so it can keep the best weights, and records the masks that change. The FHE
per-neuron fan-in cap (:class:`prunekit.fhe.FanInConstraint`) is one::

    class AtMostPerRow(pk.Constraint):
        name = "at_most_per_row"

        def __init__(self, k):
            self.k = k

        def allow(self, keep, context):
            counts = torch.full((keep.shape[0],), self.k)
            return pk.keep_best_per_row(context.scores, keep, counts)

    pk.prune(model, 0.5, constraints=[AtMostPerRow(8)])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.targets import Target
from .granularity import Granularity
from .schedules import Schedule


@dataclass(frozen=True)
class ConstraintContext:
    """What a constraint may read about the weight it limits.

    Attributes:
        target: the weight (``target.param``, ``target.module``, ``target.to_oik``).
        scores: the criterion's element scores, ``(O, I, K)``, higher = keep.
        schedule: the pruner's schedule, and ``at_step`` the step of this event (None: the final
            masks), so a constraint may tighten with the schedule.
    """

    target: Target
    scores: torch.Tensor
    schedule: Schedule
    at_step: int | None


class Constraint:
    """Base class of post-selection constraints (see the module docstring)."""

    name = "constraint"

    def validate(self, targets: list[Target], granularity: Granularity) -> None:
        """Raise ``ValueError`` before anything changes if the constraint cannot apply to these
        targets or this granularity."""

    def allow(self, keep: torch.Tensor, context: ConstraintContext) -> torch.Tensor:
        """The allowed ``(O, I, K)`` bool keep-mask given the proposed one (return a subset of ``keep``)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """A JSON-able description, stored in the pruner's configuration."""
        return {"name": self.name}


def keep_best_per_row(scores_oik: torch.Tensor, keep_oik: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Keep, in every output row, the ``allowed[row]`` best-scoring weights among those kept.

    Ties keep the earlier position (stable sort), so the result is deterministic.
    """
    out_dim = keep_oik.shape[0]
    keep = keep_oik.reshape(out_dim, -1)
    scores = scores_oik.reshape(out_dim, -1).masked_fill(~keep, float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(keep.shape[1], device=keep.device).expand_as(order))
    return (keep & (ranks < allowed.to(keep.device).unsqueeze(1))).reshape(keep_oik.shape)
