"""What both training-framework callbacks share: building the pruner from arguments or a recipe once
the framework hands over the model, and stepping it once per real optimizer step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..pruner import Pruner
from ..recipes import load_recipe

#: The key of the pruner's state in a framework's checkpoint.
STATE_KEY = "prunekit_pruner"


class PrunerSpec:
    """How to build the pruner: exactly one of a ready ``pruner``, a ``recipe`` (path, YAML text or
    dict; ``options`` then override its values) or the pruner's own arguments in ``options``. A recipe
    is read and validated now, so a bad one fails before training starts."""

    def __init__(self, pruner: Pruner | None, recipe: Any, options: Mapping[str, Any]):
        if pruner is not None and (recipe is not None or options):
            raise TypeError("pass a ready pruner= or the pruner's arguments / a recipe=, not both")
        if pruner is not None and not isinstance(pruner, Pruner):
            raise TypeError(f"pruner= must be a prunekit.Pruner, got {type(pruner).__name__}")
        if pruner is None and recipe is None and not options:
            raise TypeError("say how to prune: the pruner's arguments (sparsity=..., ...), recipe= or pruner=")
        self.pruner, self.options = pruner, dict(options)
        self.recipe = None if recipe is None else load_recipe(recipe)

    def build(self, model: nn.Module) -> Pruner:
        if self.pruner is not None:
            if self.pruner.model is not model and self.pruner.model is not getattr(model, "module", None):
                raise ValueError("the pruner= given prunes another model than the one being trained")
            return self.pruner
        if self.recipe is not None:
            return Pruner.from_recipe(model, self.recipe, **self.options)
        options = dict(self.options)
        return Pruner(model, options.pop("sparsity", None), **options)


def catch_up(pruner: Pruner, optimizer_steps: int) -> int:
    """Step ``pruner`` until it has counted ``optimizer_steps`` optimizer steps (the framework's own
    count, which skips the micro-batches of gradient accumulation); returns how many steps were taken."""
    taken = 0
    while pruner.step_count < optimizer_steps:
        pruner.step()
        taken += 1
    return taken
