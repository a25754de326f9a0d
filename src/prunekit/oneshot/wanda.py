"""Wanda (Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning Approach for Large Language
Models"): score S_ij = |W_ij| · ‖X_j‖₂, where ‖X_j‖₂ is the L2 norm of input feature j over all
calibration tokens; weights are compared within each output row and the lowest go. No weight update.
"""

from __future__ import annotations

import torch

from ..core.targets import Target
from ..methods.criteria import Criterion, register_criterion
from .rows import keep_n_of_m, keep_per_row


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j‖₂ for a weight in (out, in) orientation and Σ_tokens X_j² per input channel."""
    return weight.detach().abs().float() * sq_norms.to(weight.device).float().sqrt().unsqueeze(0)


def wanda_keep(
    weight: torch.Tensor, sq_norms: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Wanda's keep-mask (bool, (out, in)): per row, prune ``round(in · sparsity)`` weights with the lowest
    |W_ij|·‖X_j‖₂ (``sparsity`` a fraction), or with ``nm=(n, m)`` keep the n best of every m inputs."""
    scores = wanda_scores(weight, sq_norms)
    if nm is not None:
        return keep_n_of_m(scores, *nm)
    return keep_per_row(scores, min(round(scores.shape[1] * sparsity), scores.shape[1] - 1))


class Wanda(Criterion):
    """Wanda's score |W_ij|·‖X_j‖₂ as a plain criterion (name ``"wanda"``).

    It reads the calibration statistics from :attr:`stats`: ``{target.full_name: Σ_tokens X_j²}``, one
    float tensor of the layer's input units (input features; input channels for a conv), filled by the
    calibration step (:func:`prunekit.oneshot.prune_with_calibration`, or your own hooks) before any score
    is asked for (or in ``calibration_statistics[name]["input_sq_norm"]``, as a shared calibration pass
    hands them to criteria that list :attr:`statistics`). Scores are per weight; a granularity reduces them as usual, so the same statistics
    also score structured units.
    """

    name = "wanda"
    #: What a shared calibration pass should collect for it (``calibration_statistics[name][...]``).
    statistics = ("input_sq_norm",)

    def __init__(self, stats: dict[str, torch.Tensor] | None = None, *, filled_by_calibration: bool = False):
        self.stats: dict[str, torch.Tensor] = {} if stats is None else stats
        #: True when a calibrated one-shot job (:mod:`prunekit.oneshot`) fills ``stats`` as it prunes.
        self.filled_by_calibration = filled_by_calibration

    def has_statistics(self) -> bool:
        return bool(self.stats) or self.filled_by_calibration

    def _sq_norms(self, full_name: str) -> torch.Tensor | None:
        found = self.stats.get(full_name)
        if found is None:  # statistics handed over by a shared calibration pass, if any
            found = (getattr(self, "calibration_statistics", None) or {}).get(full_name, {}).get("input_sq_norm")
        return found

    def score(self, target: Target) -> torch.Tensor:
        sq_norms = self._sq_norms(target.full_name)
        if sq_norms is None:
            raise ValueError(
                f"criterion 'wanda' has no calibration statistics for {target.full_name!r}: pass calibration= "
                "to pk.prune, or fill Wanda.stats[name] with Σ X_j² over the layer's inputs"
            )
        in_dim = target.oik_shape[1]
        if sq_norms.numel() != in_dim:
            raise ValueError(
                f"Wanda statistics for {target.full_name!r} have {sq_norms.numel()} entries, the layer {in_dim} inputs"
            )
        oik = target.to_oik(target.param.detach().abs().float())
        scores = oik * sq_norms.to(oik.device).float().sqrt().view(1, -1, 1)
        return target.from_oik(scores)


register_criterion("wanda", Wanda)
