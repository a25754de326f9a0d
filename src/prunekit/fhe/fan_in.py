"""The per-neuron fan-in constraint behind ``pk.Pruner(model, max_fan_in=...)``.

After every pruning event each output neuron (a row of a Linear weight, a filter of a conv:
in_channels/groups × kernel positions) keeps at most its allowed number of non-zero weights,
the best ones by the pruner's criterion. The allowed number is

- a whole number Ω (e.g. ``pk.fhe.max_fan_in(2, 2, 16)`` = 7281) for every neuron, or
- per neuron, what an :class:`~prunekit.fhe.budget.AccumulatorBudget` lets fit, from the layer's
  quantized weights at that event.

It is an intersection with the sparsity target's mask, so whichever is stricter wins in each
neuron. It applies to every pruned layer, including those ``layer_sparsity`` leaves dense (0.0):
``exclude`` a layer to leave it uncapped. Under a schedule the cap tightens with it: a neuron of fan-in F whose final allowance is k
may keep round(F·(1 − s_t)) weights at step t, where s_t is the schedule's sparsity at t for a
final sparsity of 1 − k/F, and exactly k from the schedule's last event on. Masks are therefore
chosen from the weights as they train, not fixed at initialization (Concrete ML's built-in
networks prune once, before training, with a whole-tensor amount, so Ω holds only on average).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.targets import Target
from ..methods.constraints import Constraint, ConstraintContext, keep_best_per_row
from ..methods.granularity import Granularity
from ..methods.schedules import Schedule
from .budget import AccumulatorBudget


class FanInConstraint(Constraint):
    """At most ``limit`` non-zero weights per output neuron (an int Ω or an exact budget)."""

    name = "max_fan_in"

    def __init__(self, limit: int | AccumulatorBudget):
        if isinstance(limit, AccumulatorBudget):
            self.limit: int | AccumulatorBudget = limit
        elif isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(
                "max_fan_in takes a whole number of weights per neuron (e.g. pk.fhe.max_fan_in(2, 2, 16)) "
                f"or a pk.fhe.AccumulatorBudget, got {limit!r}"
            )
        elif limit < 1:
            raise ValueError(f"max_fan_in must be at least 1 weight per neuron, got {limit}")
        else:
            self.limit = limit

    def validate(self, targets: list[Target], granularity: Granularity) -> None:
        """Raise ``ValueError`` for layers or granularities the cap cannot be applied to."""
        if not (granularity.is_single_weight or granularity.selects_within_groups):
            raise ValueError(
                f"max_fan_in caps single weights in each neuron, which granularity {granularity.name!r} cannot "
                "express without breaking its units; use granularity='weight' or pk.NM(n, m) with max_fan_in"
            )
        for target in targets:
            if not target.handler.sums_inputs:
                raise ValueError(
                    f"max_fan_in applies to layers whose outputs sum their inputs (Linear, Conv, ConvTranspose); "
                    f"layer {target.name!r} is {type(target.module).__name__}: exclude it (exclude=[{target.name!r}])"
                )

    def allowed(self, target: Target, scores_oik: torch.Tensor, keep_oik: torch.Tensor) -> torch.Tensor:
        """Final allowance per neuron, int64 (O,)."""
        out_dim = keep_oik.shape[0]
        if isinstance(self.limit, AccumulatorBudget):
            return self.limit.kept_counts(target.to_oik(target.param.detach()), scores_oik, keep_oik)
        return torch.full((out_dim,), self.limit, dtype=torch.int64, device=keep_oik.device)

    @torch.no_grad()
    def allow(self, keep: torch.Tensor, context: ConstraintContext) -> torch.Tensor:
        """Keep at most the (scheduled) allowance of weights in every neuron, the best by score."""
        allowed = self.allowed(context.target, context.scores, keep)
        allowed = scheduled_allowance(allowed, keep[0].numel(), context.schedule, context.at_step)
        return keep_best_per_row(context.scores, keep, allowed)

    def to_dict(self) -> dict:
        limit = self.limit if isinstance(self.limit, int) else repr(self.limit)
        return {"name": self.name, "limit": limit}

    def __repr__(self) -> str:
        return repr(self.limit)


def scheduled_allowance(final: torch.Tensor, fan_in: int, schedule: Schedule, at_step: int | None) -> torch.Tensor:
    """Per-neuron allowance at ``at_step``: round(F·(1 − s_t)) with s_t the schedule's sparsity for a
    final sparsity of 1 − k/F, never below the final k nor above F. ``at_step`` None: the final k."""
    if at_step is None:
        return final
    result = final.clone()
    for k in torch.unique(final).tolist():
        sparsity_t = schedule.sparsity_at(at_step, 1.0 - min(k, fan_in) / fan_in)
        allowed = min(max(round(fan_in * (1.0 - sparsity_t)), k), fan_in)
        result[final == k] = allowed
    return result


def neuron_fan_in(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Non-zero weights per output neuron of a Linear/Conv weight, int64 (O,)."""
    target = Target("", module)
    return target.to_oik(weight != 0).reshape(target.oik_shape[0], -1).sum(dim=1)
