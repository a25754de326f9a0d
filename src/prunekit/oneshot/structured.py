"""Structured one-shot pruning from calibration data: heads, MLP neurons and conv channels.

Units are the coupled channel groups of :mod:`prunekit.structure` (one MLP neuron: a row of the up
projection and a column of the down projection; one attention head: rows of q, k, v and columns of
the output projection; one conv channel: a filter, its norm entries and the input columns reading it).
A unit's score is the sum of the element scores of every targeted weight that goes with it (the rows
that write it and the columns that read it, :func:`prunekit.structure.units.unit_scores`), where the
element score of weight W_ij, with X_j the layer's input channel j over all calibration positions, is:

==========  =======================  ==================================================================
criterion   element score of W_ij    source
==========  =======================  ==================================================================
``wanda``   \\|W_ij\\|·‖X_j‖₂          Sun et al. 2023 (Wanda), summed over the group as FLAP's
                                     "Wanda-sp" baseline does (An et al. 2024)
``flap``    W_ij²·Var(X_j)           An et al. 2024 (FLAP): a column's fluctuation Var(X_j)·‖W_:,j‖²
==========  =======================  ==================================================================

Any weight-only criterion of :mod:`prunekit.criteria` (``"magnitude"``, ``"l2"``, ``"random"``) may be
used too. Then, with ``reconstruct``, the layers that read removed channels are corrected
(:mod:`.reconstruct`): FLAP's bias compensation (``"bias"``) or a least-squares refit against the dense
model's outputs (``True``), and the masks stay as they are, so :func:`prunekit.compact` removes the
units exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..core.targets import LayerSelector, Target
from ..methods.criteria import Criterion, L2Magnitude, Magnitude, Random
from ..methods.granularity import OutChannel, get_granularity
from ..pruner import Pruner
from . import reconstruct as reconstruction
from .activations import CalibrationRecord, as_batches, collect_statistics
from .progress import check_progress
from .reconstruct import (
    MODES,
    RefitReport,
    compensate_biases,
    find_consumers,
    kept_inputs,
    refit_least_squares,
    warn_skipped,
)
from .snapshot import TensorSnapshot


class ActivationCriterion(Criterion):
    """A criterion whose element scores weight |W| by statistics of each layer's input channels,
    collected over calibration batches (:mod:`.activations`) before pruning."""

    def __init__(self) -> None:
        self.record: CalibrationRecord | None = None

    def channel_scale(self, target: Target) -> torch.Tensor:
        """The per-input-channel factor in the (out, in, kernel) layout of ``target``'s weight."""
        stats = None if self.record is None else self.record.statistics.get(target.name)
        if stats is None or not stats.width or target.param_name != "weight":
            raise ValueError(
                f"criterion {self.name!r} needs the inputs of {target.name!r}, but that layer was never called "
                "as a module on a tensor during calibration (nn.MultiheadAttention applies its weights "
                "functionally, for example); exclude the layer or use criterion='magnitude'"
            )
        per_channel = self.channel_statistic(stats).to(target.param.device)
        out_dim, in_dim, _ = target.oik_shape
        if per_channel.numel() == in_dim:
            return per_channel.reshape(1, in_dim, 1)
        groups = per_channel.numel() // in_dim  # a grouped conv: output o reads input group o // (out / groups)
        group = torch.arange(out_dim, device=per_channel.device) // (out_dim // groups)
        index = group.reshape(-1, 1) * in_dim + torch.arange(in_dim, device=per_channel.device)
        return per_channel[index].reshape(out_dim, in_dim, 1)

    def channel_statistic(self, stats) -> torch.Tensor:
        raise NotImplementedError


class WandaGroups(ActivationCriterion):
    """|W_ij|·‖X_j‖₂ (Sun et al. 2023); a unit scores the sum over its weights."""

    name = "wanda"

    def channel_statistic(self, stats):
        return stats.norm

    def score(self, target):
        weight = target.to_oik(target.param.detach().abs().double())
        return target.from_oik(weight * self.channel_scale(target)).float()


class Fluctuation(ActivationCriterion):
    """W_ij²·Var(X_j) (An et al. 2024, FLAP's fluctuation metric); a unit scores the sum over its weights."""

    name = "flap"

    def channel_statistic(self, stats):
        return stats.variance

    def score(self, target):
        weight = target.to_oik(target.param.detach().double().square())
        return target.from_oik(weight * self.channel_scale(target)).float()


ACTIVATION_CRITERIA = {"wanda": WandaGroups, "flap": Fluctuation}
WEIGHT_CRITERIA = {"magnitude": Magnitude, "l2": L2Magnitude, "random": Random}


def prune_structured_with_calibration(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    calibration: Iterable | None = None,
    example_inputs: Any = None,
    criterion: str = "wanda",
    reconstruct: bool | str = False,
    granularity: Any = "out_channel",
    sparsity_in: str = "channels",
    layer_sparsity: Mapping[str, float] | None = None,
    include: LayerSelector | Iterable[LayerSelector] | None = None,
    exclude: LayerSelector | Iterable[LayerSelector] | None = None,
    min_kept: int = 1,
    damp: float = 0.1,
    progress: bool = True,
    **options: Any,
) -> Pruner:
    """Prune whole heads, neurons and channels of a trained model, scored from calibration data, and
    optionally correct the layers that read them; returns the :class:`~prunekit.Pruner` holding the
    masks (``pk.compact(model, example_inputs)`` then removes the units exactly).

    Args:
        sparsity: fraction of what ``sparsity_in`` counts to remove, in [0, 1): ``"channels"`` (units),
            ``"params"`` or ``"macs"`` (see :class:`prunekit.Pruner`).
        calibration: an iterable of batches the model accepts (tensor, tuple of positional inputs or
            dict of keyword inputs), read once. Needed by ``"wanda"``, ``"flap"`` and ``reconstruct``.
        example_inputs: one batch, used to trace which channels are coupled.
        criterion: ``"wanda"`` or ``"flap"`` (activation-aware, see the module docstring), or
            ``"magnitude"``, ``"l2"``, ``"random"``.
        reconstruct: ``False`` (masks only), ``"bias"`` (FLAP's bias compensation) or ``True`` /
            ``"least_squares"`` (He et al. 2017 refit with a bias shift, see :mod:`.reconstruct`).
        damp: damping of the least-squares refit towards the masked weights, as a fraction of the mean
            diagonal of XᵀX (0.1 keeps held-out outputs closest in benchmarks/structured_oneshot.py;
            less fits the calibration data more closely and generalises worse).
        progress: show a progress bar over the refit layers (tqdm, when installed).
        layer_sparsity, include, exclude, min_kept, **options: as for :class:`prunekit.Pruner`
            (``scope``, ``round_to``, ``prune_only``, ``max_layer_sparsity``, ``prune_outputs``).

    The report of each refit layer (calibration error before and after) is left in
    ``pruner.reconstruction`` (a list of :class:`.reconstruct.RefitReport`; empty without ``reconstruct``).
    Nothing is changed when the call raises.
    """
    mode = _check_mode(reconstruct)
    check_progress(progress)
    if not isinstance(get_granularity(granularity), OutChannel):
        what = "reconstruct" if mode else f"criterion={criterion!r} with calibration"
        raise ValueError(
            f"{what} here needs granularity='out_channel' (whole heads, neurons and channels): with "
            f"granularity={granularity!r} no channel is removed, so no layer loses inputs to refit; for "
            "unstructured or N:M sparsity use a criterion that updates the weights itself (sparsegpt)"
        )
    for option, why in (("schedule", "it prunes once, now"), ("coupled", "it removes coupled units only")):
        if option in options:
            raise TypeError(f"{option}= is not accepted by structured pruning with calibration: {why}")
    if example_inputs is None:
        raise ValueError(
            "structured pruning needs example_inputs (one batch the model accepts, e.g. calibration[0]) "
            "to trace which channels are coupled"
        )
    if criterion not in ACTIVATION_CRITERIA and criterion not in WEIGHT_CRITERIA:
        valid = ", ".join(map(repr, [*ACTIVATION_CRITERIA, *WEIGHT_CRITERIA]))
        raise ValueError(f"unknown criterion {criterion!r} for structured pruning with calibration; valid: {valid}")
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not damp >= 0:
        raise ValueError(f"damp must be a number ≥ 0 (a fraction of the mean diagonal of XᵀX), got {damp!r}")
    batches = as_batches(calibration)
    data_aware = criterion in ACTIVATION_CRITERIA
    if (data_aware or mode) and not batches:
        needs = f"criterion={criterion!r}" if data_aware else f"reconstruct={reconstruct!r}"
        raise ValueError(
            f"{needs} needs calibration= (an iterable of batches the model accepts, e.g. tokenizer outputs); "
            f"{'it was empty' if calibration is not None else 'it is missing'}"
        )
    if batches and not (data_aware or mode):
        raise ValueError(
            f"criterion {criterion!r} without reconstruct does not read calibration data: drop calibration=, "
            "or use criterion='wanda' / 'flap', or reconstruct=True / 'bias'"
        )
    scorer = ACTIVATION_CRITERIA[criterion]() if data_aware else WEIGHT_CRITERIA[criterion]()
    pruner = Pruner(
        model, sparsity, criterion=scorer, granularity="out_channel", example_inputs=example_inputs,
        sparsity_in=sparsity_in, layer_sparsity=layer_sparsity, include=include, exclude=exclude,
        min_kept=min_kept, **options,
    )  # fmt: skip
    record = collect_statistics(model, batches, {t.name: t.module for t in pruner.targets}) if batches else None
    if data_aware:
        scorer.record = record
    kept_before = {t.full_name: kept_inputs(t) for t in pruner.targets}
    # Not a dense model: a copy of only the tensors pruning and reconstruction may change.
    dense = TensorSnapshot(_touched_modules(pruner, record), reconstruction.CACHE_BYTES) if mode else None
    pruner.prune()  # validates the masks before it changes anything
    pruner.reconstruction: list[RefitReport] = []
    if not mode:
        return pruner
    added: list[nn.Module] = []
    try:
        consumers, skipped = find_consumers(pruner.targets, record, kept_before)
        if mode == "bias":
            reports = compensate_biases(dense, consumers, record, added)
        else:
            reports = refit_least_squares(model, dense, batches, consumers, record, float(damp), added, progress)
    except BaseException:
        dense.restore(added)
        raise
    finally:
        dense.close()
    warn_skipped(skipped, [r.layer for r in reports if r.bias_into == "none"])
    pruner.reconstruction = reports
    return pruner


def _check_mode(reconstruct: object) -> str | None:
    if isinstance(reconstruct, str) and reconstruct in MODES:
        return reconstruct
    if isinstance(reconstruct, bool):
        return "least_squares" if reconstruct else None
    raise ValueError(f"reconstruct must be False, True, 'least_squares' or 'bias', got {reconstruct!r}")


def _touched_modules(pruner: Pruner, record: CalibrationRecord | None) -> list[nn.Module]:
    """The modules whose tensors pruning or reconstruction may change: the targets, the modules sliced
    with them, and the BatchNorms that may take a bias shift."""
    modules = [t.module for t in pruner.targets]
    if pruner.dependencies is not None:  # the tensors cut with the targets' units (a unit no target has stays)
        weights = {(id(t.module), t.param_name) for t in pruner.targets}
        pieces = pruner.dependencies.slices
        units = set().union(*[set(p.unit.tolist()) for p in pieces if (id(p.module), p.tensor_name) in weights])
        units.discard(-1)
        modules += [p.module for p in pieces if units.intersection(p.unit.tolist())]
    if record is not None:
        modules += list(record.batchnorm_after.values())
    return modules
