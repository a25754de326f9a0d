"""One entry for data-aware one-shot pruning: :func:`prune_with_calibration` (``pk.prune`` calls it when
``calibration`` is given, the criterion is ``"wanda"``/``"sparsegpt"``, or ``layer_sparsity="owl"``).

Everything is validated first (:func:`plan_calibrated`, which touches nothing); then the blocks are pruned
one at a time from their own inputs (:func:`run_calibrated`, see :mod:`prunekit.oneshot.blocks`). Only the
Linear layers inside the blocks are pruned (embeddings, the LM head and pooler/classifier stay dense,
as in the SparseGPT and Wanda papers); the result lists the layers left out.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core import masks as mask_store
from ..core.layers import is_hf_conv1d
from ..core.targets import LayerSelector, Target
from ..engines.calibration import InputRecorder, LayerStatistics
from ..methods.criteria import Criterion
from ..methods.granularity import Granularity
from .blocks import next_inputs, run_block
from .calibration import BlockInputs, CalibrationError, capture_inputs
from .offload import read_weight, write_weight
from .owl import OWL, outlier_ratio, owl_sparsities
from .plan import OneShotPlan, plan_calibrated, pruner_options, wants_calibration
from .progress import progress_bar
from .rows import keep_n_of_m, keep_per_row
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_keep, wanda_scores


@dataclass
class OneShotResult:
    """What :func:`run_calibrated` did: per layer, the sparsity asked for and reached (fractions)."""

    criterion: str
    granularity: str
    blocks: list[str]
    target_sparsity: dict[str, float] = field(default_factory=dict)
    sparsity: dict[str, float] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    batches: int = 0
    tokens: int = 0
    seconds: float = 0.0
    #: Fraction of the pruned layers' weights that are masked, over all of them.
    overall_sparsity: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"{self.criterion} ({self.granularity}) on {len(self.sparsity)} layers in {len(self.blocks)} blocks, "
            f"{self.batches} calibration batches ({self.tokens} tokens per layer), {self.seconds:.1f} s; "
            f"sparsity {self.overall_sparsity:.4f}"
        ]
        if self.left_out:
            lines.append(f"left dense (outside the blocks): {', '.join(self.left_out)}")
        return "\n".join(lines)


def _in_features(t: Target) -> int:
    return t.oik_shape[1]


def _out_in(t: Target, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t() if is_hf_conv1d(t.module) else tensor


def _layer_sparsity(plan: OneShotPlan, t: Target, block_sparsity: float) -> float:
    sparsity = plan.overrides.get(t.name, block_sparsity)
    numel = t.param.numel()
    return min(sparsity, max(0.0, (numel - plan.min_kept) / numel))


@torch.no_grad()
def _prune_layer(plan: OneShotPlan, t: Target, stats: LayerStatistics, sparsity: float) -> torch.Tensor:
    """Prune one Linear; return its keep-mask in the weight's own layout."""
    weight = _out_in(t, read_weight(t.module))
    nm = plan.nm
    new = None
    if plan.criterion == "sparsegpt":
        new, keep = sparsegpt_prune(weight, stats.hessian(), sparsity, nm, name=t.full_name, overwrite_hessian=True)
    elif plan.criterion == "wanda":
        keep = wanda_keep(weight, stats.sq_norm, sparsity, nm)
        plan.wanda.stats[t.full_name] = stats.sq_norm.detach().cpu().clone()
    else:  # magnitude, layer-wise
        scores = weight.detach().abs().float()
        if nm is not None:
            keep = keep_n_of_m(scores, *nm)
        else:
            keep = keep_per_row(scores.reshape(1, -1), round(scores.numel() * sparsity)).view_as(scores)
    keep = _out_in(t, keep.to(weight.device)).contiguous()
    if t.param.device.type == "meta" or new is not None:
        values = _out_in(t, weight if new is None else new.to(weight.device)) * keep
        write_weight(t.module, values)  # offloaded weights are zeroed where they are kept
    mask_store.set_mask(t.module, "weight", keep if t.param.device.type == "meta" else keep.to(t.param.device))
    return keep


def _collect(
    block: nn.Module, targets: list[Target], inputs: BlockInputs, plan: OneShotPlan, *, hessian: bool,
    outputs: bool = False,
) -> dict[str, LayerStatistics] | tuple[dict[str, LayerStatistics], BlockInputs]:  # fmt: skip
    """Run ``block`` once on every captured batch, recording its targets' input statistics (Σ X_j² for
    Wanda, XᵀX with ``hessian``); with ``outputs``, also return the block's outputs as the next block's
    inputs, from the same pass."""
    layers = {t.full_name: t.module for t in targets}
    recorder = InputRecorder(layers, lambda: LayerStatistics(sq_norm=not hessian, gram=hessian))

    def before(index: int) -> None:
        recorder.mask = inputs.masks[index]

    try:
        if outputs:
            following = next_inputs(block, inputs, plan.storage, before=before)
        else:
            for index in range(len(inputs.args)):
                before(index)
                run_block(block, inputs, index, plan.storage)
    finally:
        recorder.remove()
    return (recorder.statistics, following) if outputs else recorder.statistics


def _owl_block_sparsities(plan: OneShotPlan, bar) -> list[list[float]]:
    """OWL pass over the dense model: each block's outlier ratio of the Wanda scores of all its pruned
    layers together (one M × mean threshold per block, as in Yin et al.'s code), then its sparsity."""
    ratios, sizes = [], []
    for (_, stack), stack_targets in zip(plan.stacks, plan.block_targets):
        inputs = capture_inputs(plan.model, stack[0], plan.batches, plan.storage)
        for block, targets in zip(stack, stack_targets):
            if targets:
                stats = _collect(block, targets, inputs, plan, hessian=False)

                def scores(targets=targets, stats=stats):  # recomputed per pass: one layer's scores at a time
                    for t in targets:
                        yield wanda_scores(_out_in(t, read_weight(t.module)), stats[t.full_name].sq_norm)

                ratios.append(outlier_ratio(scores, plan.owl.outlier_multiplier))
                sizes.append(sum(t.param.numel() for t in targets))
            inputs = next_inputs(block, inputs, plan.storage)
            if bar is not None:
                bar.update(1)
    spread = iter(owl_sparsities(ratios, sizes, plan.sparsity, plan.owl.spread))
    return [[next(spread) if targets else plan.sparsity for targets in stack] for stack in plan.block_targets]


def run_calibrated(plan: OneShotPlan) -> OneShotResult:
    """Prune the planned model block by block (sequentially) and store the masks on its layers."""
    started = time.perf_counter()
    model = plan.model
    modes = {m: m.training for m in model.modules()}
    result = OneShotResult(
        plan.criterion, plan.granularity.name, [f"{p}.{i}" for p, s in plan.stacks for i in range(len(s))]
    )
    result.left_out = list(plan.left_out)
    result.batches = len(plan.batches)
    num_blocks = sum(len(s) for _, s in plan.stacks)
    bar = progress_bar(num_blocks * (2 if plan.owl else 1), plan.progress, f"prunekit {plan.criterion}")
    model.eval()
    try:
        if plan.owl:
            block_sparsity = _owl_block_sparsities(plan, bar)
        else:
            block_sparsity = [[plan.sparsity] * len(s) for _, s in plan.stacks]
        pruned = kept = 0
        for s, (_, stack) in enumerate(plan.stacks):
            inputs = capture_inputs(model, stack[0], plan.batches, plan.storage)
            for b, block in enumerate(stack):
                targets = plan.block_targets[s][b]
                layer_sparsity = {t.full_name: _layer_sparsity(plan, t, block_sparsity[s][b]) for t in targets}
                active = [t for t in targets if layer_sparsity[t.full_name] > 0.0]
                following = None
                if active:
                    hessian = plan.criterion == "sparsegpt"
                    if plan.sequential or b + 1 == len(stack):
                        stats = _collect(block, active, inputs, plan, hessian=hessian)
                    else:  # one pass: the dense block's statistics and its outputs for the next block
                        stats, following = _collect(block, active, inputs, plan, hessian=hessian, outputs=True)
                    for t in active:
                        layer_stats = stats.pop(t.full_name)  # freed as soon as its layer is pruned
                        keep = _prune_layer(plan, t, layer_stats, layer_sparsity[t.full_name])
                        result.target_sparsity[t.full_name] = plan.sparsity if plan.nm else layer_sparsity[t.full_name]
                        result.sparsity[t.full_name] = 1.0 - float(keep.float().mean())
                        kept += int(keep.sum())
                        pruned += keep.numel() - int(keep.sum())
                        result.tokens = layer_stats.tokens
                        del layer_stats
                if following is not None:
                    inputs = following
                elif b + 1 < len(stack):
                    inputs = next_inputs(block, inputs, plan.storage)
                if bar is not None:
                    bar.update(1)
            del inputs
        result.overall_sparsity = pruned / max(pruned + kept, 1)
    finally:
        if bar is not None:
            bar.close()
        for module, mode in modes.items():
            module.training = mode
    result.seconds = time.perf_counter() - started
    return result


def prune_with_calibration(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    criterion: str | Criterion = "wanda",
    granularity: str | Granularity = "weight",
    calibration: Iterable | None = None,
    layer_sparsity: str | OWL | Mapping[str, float] | None = None,
    include: LayerSelector | Iterable[LayerSelector] | None = None,
    exclude: LayerSelector | Iterable[LayerSelector] | None = None,
    min_kept: int = 1,
    blocks: str | Sequence[str] | None = None,
    offload: bool | str = "auto",
    progress: bool = True,
    sequential: bool | None = None,
) -> OneShotResult:
    """Prune ``model`` once from calibration data, block by block, and store the masks on its layers.

    Args:
        sparsity: fraction of each pruned layer's weights to remove, in [0, 1) (not needed with ``pk.NM``).
        criterion: ``"wanda"`` (|W_ij|·‖X_j‖₂ per output row, Sun et al. 2023), ``"sparsegpt"`` (OBS
            pruning with weight update, Frantar & Alistarh 2023) or ``"magnitude"`` (with OWL only).
        granularity: ``"weight"`` (unstructured) or ``pk.NM(n, m)``.
        calibration: an iterable of batches the model accepts (tensor, tuple or dict), read once.
        layer_sparsity: ``"owl"`` or ``pk.OWL(outlier_multiplier=5, spread=0.08)`` (Yin et al. 2024: one
            sparsity per block from its share of outlier scores, spanning 2 × spread around ``sparsity``,
            total exact) or ``{name pattern: sparsity}`` overrides (0.0 leaves a layer dense).
        include / exclude / min_kept: as for :class:`prunekit.Pruner` (min_kept: weights per layer).
        blocks: path(s) of the ``nn.ModuleList`` of blocks, when they are not found automatically.
        offload: keep the captured activations on the CPU (``"auto"``: when the model is on a GPU).
        progress: show a progress bar over blocks (tqdm, when installed).
        sequential: ``True``: each block is calibrated on the outputs of the already pruned blocks before
            it, as SparseGPT does (each block runs twice: statistics from its inputs, then its pruned outputs
            for the next block); ``False`` (Wanda only): statistics from the dense model's activations, one
            pass per block (the block's statistics and its dense outputs come from the same pass); ``None``:
            the criterion's default (:data:`prunekit.oneshot.plan.SEQUENTIAL_DEFAULT`): one pass for Wanda,
            which updates no weight and so needs only the activation norms of one forward pass (Sun et al.
            2023); on MiniLM this costs 1.25× the calibration forward passes instead of 2.0×, at an
            embedding cosine +0.003 / +0.005 / −0.007 from the sequential one at 50% / 2:4 / 70%
            (benchmarks/results/oneshot_wanda_passes.md). Sequential for SparseGPT, whose weight updates
            the next blocks must see, and for magnitude with OWL.

    Raises ``ValueError``/``TypeError``/:class:`CalibrationError` before touching the model on bad input.
    """
    plan = plan_calibrated(
        model,
        sparsity,
        criterion=criterion,
        granularity=granularity,
        calibration=calibration,
        layer_sparsity=layer_sparsity,
        include=include,
        exclude=exclude,
        min_kept=min_kept,
        blocks=blocks,
        offload=offload,
        progress=progress,
        sequential=sequential,
    )
    return run_calibrated(plan)


__all__ = [
    "CalibrationError",
    "OneShotPlan",
    "OneShotResult",
    "plan_calibrated",
    "prune_with_calibration",
    "pruner_options",
    "run_calibrated",
    "wants_calibration",
]
