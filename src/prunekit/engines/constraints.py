"""Applies post-selection constraints (:mod:`prunekit.methods.constraints`) to a mask update."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..core.targets import Target
from ..methods.constraints import Constraint, ConstraintContext
from ..methods.criteria import Criterion
from ..methods.schedules import Schedule
from .update import MaskUpdate


@torch.no_grad()
def apply_constraints(
    update: MaskUpdate,
    constraints: Sequence[Constraint],
    targets: list[Target],
    criterion: Criterion,
    schedule: Schedule,
    at_step: int | None,
    keep_of: Callable[[Target], torch.Tensor | None],
    prunes_bias: bool,
) -> None:
    """Let every constraint cut each target's proposed mask (new, or current if the update leaves it
    alone, or all-kept), and record the masks that change in ``update``."""
    if not constraints:
        return
    for target in targets:
        keep = update.proposed_keep(target, keep_of(target))
        if keep is None:
            keep = torch.ones_like(target.param, dtype=torch.bool)
        keep_oik = target.to_oik(keep)
        context = ConstraintContext(target, target.to_oik(criterion.score(target).float()), schedule, at_step)
        allowed = keep_oik
        for constraint in constraints:
            allowed = constraint.allow(allowed, context)
        if not torch.equal(allowed, keep_oik):
            update.magnitude_cuts.pop((target.module, target.param_name, target.full_name), None)
            update.add(target, allowed, prunes_bias)
