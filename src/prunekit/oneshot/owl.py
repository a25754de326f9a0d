"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): non-uniform layer sparsities.

A layer's outlier ratio D_l is the share of its Wanda scores |W_ij|·‖X_j‖₂ above M times the mean score
of its sublayer (M = 5 in the paper). Layers with more outliers are pruned less: the sparsity of layer l is
S − c·(D_l − D̄), with D̄ the parameter-weighted mean of the ratios, so the pruned total stays exactly S,
and c chosen so that no layer strays more than λ (0.08 in the paper) from S. The paper maps the ratios
linearly onto a range 2λ wide around S; here the largest deviation is λ, which keeps every layer inside
[S − λ, S + λ] whatever the ratios' spread.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

OUTLIER_MULTIPLIER = 5.0
SPREAD = 0.08


def outlier_count(scores: torch.Tensor, multiplier: float = OUTLIER_MULTIPLIER) -> int:
    """Number of entries of ``scores`` above ``multiplier`` × their mean."""
    return int((scores > multiplier * scores.mean()).sum())


def owl_sparsities(
    outlier_ratios: Sequence[float], sizes: Sequence[int], target: float, spread: float = SPREAD
) -> list[float]:
    """Layer sparsities (fractions) from outlier ratios (fractions) and layer sizes (weights).

    Σ sizes_l · s_l = target · Σ sizes_l exactly, |s_l − target| ≤ ``spread``, and more outliers give a
    lower sparsity. Equal ratios give every layer the target.
    """
    if len(outlier_ratios) != len(sizes) or not sizes:
        raise ValueError("owl_sparsities needs one outlier ratio per layer size")
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)
    weights = torch.tensor(sizes, dtype=torch.float64)
    weights = weights / weights.sum()
    deviation = ratios - (weights * ratios).sum()
    largest = float(deviation.abs().max())
    # Equal ratios leave only rounding in the deviations; spreading that by λ would break the total.
    if largest <= 1e-9 * float(ratios.abs().max()):
        return [float(target)] * len(sizes)
    limit = min(spread, target, 1.0 - target - 1e-6)  # stay within [0, 1)
    return [float(target - limit * d / largest) for d in deviation]
