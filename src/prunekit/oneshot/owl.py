"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning
LLMs to High Sparsity"): non-uniform sparsities, one per block, from each block's share of outliers.

As in the paper (§4) and its reference code (luuyin/OWL, ``prune_wanda_outlier``):

- a block's outlier ratio D_b is the share of the Wanda scores A_ij = |W_ij|·‖X_j‖₂ of *all* the block's
  pruned Linear layers, taken together, that exceed M × their mean (one threshold per block, from the
  concatenated scores, so the mean counts every weight once; M = 5 in the paper);
- the ratios are min-max normalised onto [0, 2λ]: r_b = 2λ·(D_b − min D)/(max D − min D) (λ = 0.08);
- a block's sparsity is S_b = S − (r_b − r̄): blocks with more outliers are pruned less, every layer of
  a block gets its block's S_b, the spread max S_b − min S_b is exactly 2λ, and each S_b lies within
  [S − 2λ, S + 2λ] (within S ± λ when the ratios are spread evenly, as the paper states it).

One deliberate difference: r̄ is the *parameter-weighted* mean of the r_b, so Σ_b n_b·S_b = S·Σ_b n_b
exactly (n_b: the block's pruned weights). The reference takes the plain mean over blocks, which is the
same number when all blocks have the same size (every decoder-only LLM, BERT, ViT); it differs only for
stacks of unequal blocks (T5's encoder and decoder), where the plain mean would miss the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

OUTLIER_MULTIPLIER = 5.0
SPREAD = 0.08


def _positive_real(value, what: str, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"OWL {what} must be a positive number, got {value!r}")
    if upper is not None and value >= upper:
        raise ValueError(f"OWL {what} must be below {upper:g}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class OWL:
    """OWL's options, for ``pk.prune(..., layer_sparsity=pk.OWL(outlier_multiplier=5, spread=0.08))``
    (``layer_sparsity="owl"`` is ``pk.OWL()``, the paper's values).

    ``outlier_multiplier``: M, a score is an outlier above M × the block's mean score.
    ``spread``: λ (a fraction of the weights, not percent): block sparsities span exactly 2λ around the
    target, each within ±2λ of it. Validated when made; :meth:`check_target` says whether a target
    sparsity leaves room for the spread.
    """

    outlier_multiplier: float = OUTLIER_MULTIPLIER
    spread: float = SPREAD

    def __post_init__(self):
        object.__setattr__(self, "outlier_multiplier", _positive_real(self.outlier_multiplier, "outlier_multiplier"))
        object.__setattr__(self, "spread", _positive_real(self.spread, "spread", upper=0.25))

    def check_target(self, target: float) -> None:
        """Raise ``ValueError`` unless [S − 2λ, S + 2λ] lies in [0, 1] (S_b never reaches either end of
        that range: some block is above and some below the weighted mean, so S_b < 1)."""
        low, high = 2 * self.spread, 1 - 2 * self.spread
        if not low <= target <= high:
            raise ValueError(
                f"OWL with spread λ={self.spread:g} gives blocks sparsities up to 2λ={low:g} away from the target: "
                f"use a sparsity in [{low:g}, {high:g}], or a smaller spread (at most min(S, 1 − S)/2, "
                f"layer_sparsity=pk.OWL(spread=...)); got sparsity={target:g}"
            )


def outlier_ratio(scores: Callable[[], Iterable[torch.Tensor]], multiplier: float = OUTLIER_MULTIPLIER) -> float:
    """Share (a fraction) of all entries of the tensors ``scores()`` yields, taken together, that exceed
    ``multiplier`` × the mean of all of them.

    ``scores`` is called twice (once for the mean, once to count), so the tensors need not be held at
    the same time.
    """
    total, count = 0.0, 0
    for tensor in scores():
        total += float(tensor.sum(dtype=torch.float64))
        count += tensor.numel()
    if count == 0:
        raise ValueError("outlier_ratio needs at least one score")
    threshold = multiplier * total / count
    above = sum(int((tensor > threshold).sum()) for tensor in scores())
    return above / count


def owl_sparsities(
    outlier_ratios: Sequence[float], sizes: Sequence[int], target: float, spread: float = SPREAD
) -> list[float]:
    """Block sparsities (fractions) from outlier ratios (fractions or percent: only their order and
    relative gaps matter) and block sizes (weights pruned in each block), as the module docstring says.

    Σ sizes_b · s_b = target · Σ sizes_b exactly, max s − min s = 2·``spread`` (unless all ratios are equal:
    then every block gets the target), and more outliers give a lower sparsity. Raises ``ValueError`` if a
    sparsity would leave [0, 1) (see :meth:`OWL.check_target`).
    """
    if len(outlier_ratios) != len(sizes) or not sizes:
        raise ValueError("owl_sparsities needs one outlier ratio per block size")
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)
    weights = torch.tensor(sizes, dtype=torch.float64)
    weights = weights / weights.sum()
    low, high = float(ratios.min()), float(ratios.max())
    if high == low:  # equal ratios: nothing to spread (ratios are counts over sizes, so exact)
        return [float(target)] * len(sizes)
    normalised = (ratios - low) / (high - low) * (2 * spread)
    sparsities = target - (normalised - (weights * normalised).sum())
    if float(sparsities.min()) < 0 or float(sparsities.max()) >= 1:
        raise ValueError(
            f"OWL sparsities {float(sparsities.min()):.4f}..{float(sparsities.max()):.4f} leave [0, 1) for target "
            f"{target:g} and spread {spread:g}: use a target further from 0 and 1, or a smaller spread"
        )
    return [float(s) for s in sparsities]
