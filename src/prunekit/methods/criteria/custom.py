"""A user function as a criterion."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from .base import Criterion


class Custom(Criterion):
    """Wrap a user function ``fn(weight, module) -> scores`` (a one-argument ``fn(weight)`` works too)."""

    def __init__(self, fn: Callable, reduce: str = "sum"):
        if reduce not in ("sum", "l2"):
            raise ValueError(f"reduce must be 'sum' or 'l2', got {reduce!r}")
        self.fn, self.reduce = fn, reduce
        self.name = getattr(fn, "__name__", "custom")
        # Builtins such as torch.abs have no readable signature; they take the weight alone.
        self._takes_module = _positional_arity(fn) not in (1, None)

    def score(self, target):
        weight = target.scoring_weight()
        scores = self.fn(weight, target.module) if self._takes_module else self.fn(weight)
        if not isinstance(scores, torch.Tensor):
            raise TypeError(
                f"criterion {self.name!r} must return a tensor, got {type(scores).__name__} for {target.full_name}"
            )
        if scores.shape != weight.shape:
            raise ValueError(
                f"criterion {self.name!r} returned scores of shape {tuple(scores.shape)} for {target.full_name}, "
                f"which has shape {tuple(weight.shape)}: return one score per weight"
            )
        return scores.detach().float()


def _positional_arity(fn: Callable) -> int | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)
