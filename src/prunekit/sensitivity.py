"""Sensitivity analysis: prune each layer alone at each sparsity, measure, and propose ``layer_sparsity``.

The scan Han et al. 2015 ("Learning both Weights and Connections", Fig. 5) used to choose per-layer
pruning rates, and which Distiller, NNCF and fasterai offer: for every targeted layer and every sparsity
``s`` in ``sparsities``, only that layer is pruned to ``s`` (the others stay dense), ``evaluate(model)``
is called, and the layer's weights are put back. :meth:`Sensitivity.propose` then gives every layer the
largest scanned sparsity whose metric stays within ``max_drop`` of the dense metric: a ``layer_sparsity``
mapping for :class:`prunekit.Pruner`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .api import prune
from .core.targets import LayerSelector, check_sparsity, find_targets


@dataclass
class Sensitivity:
    """What :func:`sensitivity` measured: ``metrics[layer][i]`` is the metric with only ``layer`` (a
    module name) pruned to ``sparsities[i]``; ``baseline`` is the dense model's metric."""

    baseline: float
    sparsities: list[float]
    metrics: dict[str, list[float]] = field(default_factory=dict)
    higher_is_better: bool = True

    def drop(self, layer: str) -> list[float]:
        """How much worse than the baseline each sparsity left the metric (positive = worse)."""
        sign = 1.0 if self.higher_is_better else -1.0
        return [sign * (self.baseline - value) for value in self.metrics[layer]]

    def propose(self, max_drop: float) -> dict[str, float]:
        """``{layer name: sparsity}``: for each layer the largest scanned sparsity whose metric is at most
        ``max_drop`` worse than the baseline (in the metric's own units), provided every smaller scanned
        sparsity also was; 0.0 when even the smallest is worse. Pass it as ``layer_sparsity=`` (names are
        regular expressions there, so they are escaped)."""
        if not max_drop >= 0:
            raise ValueError(f"max_drop is how much worse the metric may get, a number >= 0; got {max_drop!r}")
        proposal = {}
        for layer in self.metrics:
            chosen = 0.0
            for sparsity, drop in sorted(zip(self.sparsities, self.drop(layer))):
                if drop > max_drop:
                    break
                chosen = sparsity
            proposal[re.escape(layer)] = chosen
        return proposal

    def __str__(self) -> str:
        header = ["layer"] + [f"{s:.0%}" for s in self.sparsities]
        rows = [[layer] + [f"{value:.4g}" for value in values] for layer, values in self.metrics.items()]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [f"dense metric {self.baseline:.4g}; metric with only that layer pruned to each sparsity:"]
        for row in [header, *rows]:
            lines.append(
                "  ".join(
                    cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths))
                )
            )
        return "\n".join(lines)

    def plot(self, path: str | None = None):
        """A figure of metric against sparsity, one line per layer (needs matplotlib); saved to ``path`` if given."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(7, 4.5))
        for layer, values in self.metrics.items():
            axes.plot([100 * s for s in self.sparsities], values, marker="o", label=layer)
        axes.axhline(self.baseline, color="grey", linestyle="--", label="dense")
        axes.set_xlabel("sparsity of the one pruned layer (%)")
        axes.set_ylabel("metric")
        axes.legend(fontsize="small")
        figure.tight_layout()
        if path is not None:
            figure.savefig(path)
        return figure


def sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    sparsities: Sequence[float] = (0.25, 0.5, 0.75, 0.9),
    *,
    include: LayerSelector | Iterable[LayerSelector] | None = None,
    exclude: LayerSelector | Iterable[LayerSelector] | None = None,
    higher_is_better: bool = True,
    **options: Any,
) -> Sensitivity:
    """Prune every targeted layer alone to each of ``sparsities`` (fractions in [0, 1)) and record
    ``evaluate(model)`` (a float: accuracy, or a loss with ``higher_is_better=False``).

    ``options`` are :func:`prunekit.prune`'s (``criterion``, ``granularity``, ``data``, ...), applied to
    the one layer. The model is left as it was: each layer's parameters are restored after each run.
    """
    values = [check_sparsity(s, "each of sparsities") for s in sparsities]
    if not values:
        raise ValueError("sparsities is empty: give the fractions to scan, e.g. [0.25, 0.5, 0.75, 0.9]")
    for key in ("scope", "layer_sparsity", "schedule", "optimizer"):
        if key in options:
            raise TypeError(f"sensitivity prunes one layer at a time; {key}= does not apply")
    targets = find_targets(model, include, exclude)
    baseline = float(evaluate(model))
    result = Sensitivity(baseline, values, higher_is_better=higher_is_better)
    for target in targets:
        saved = {name: p.detach().clone() for name, p in target.module.named_parameters(recurse=False)}
        scores = []
        for sparsity in values:
            pruner = prune(model, sparsity, include=[re.escape(target.name)], **options)
            try:
                scores.append(float(evaluate(model)))
            finally:
                pruner.remove()
                with torch.no_grad():
                    for name, value in saved.items():
                        getattr(target.module, name).copy_(value)
        result.metrics[target.name] = scores
    return result
