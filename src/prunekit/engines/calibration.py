"""The shared calibration pass: run ``calibration=`` batches through the model once and collect, for
every targeted layer, the activation statistics that data-aware criteria read.

=================  ==============================================================  ===========
statistic          what                                                            shape
=================  ==============================================================  ===========
``input_sq_norm``  Σ x_j² over every token / position of the layer's input, per    (C,)
                   input channel j (‖X_j‖₂² of Wanda, Sun et al. 2023)
``input_mean``     mean of x_j over tokens / positions (bias compensation, FLAP)    (C,)
``input_gram``     Σ x xᵀ over tokens (the Hessian 2XXᵀ of SparseGPT, Frantar &     (C, C)
                   Alistarh 2023, up to the factor 2); Linear-like layers only
``tokens``         how many tokens / positions were summed                        ()
=================  ==============================================================  ===========

Channels are the layer's input features: the last dimension for Linear-like layers (a layer whose
handler has ``output_channel_dim == -1``), dimension 1 for convolutions. When a batch is a dict with
an ``attention_mask`` of shape (batch, tokens) and a layer's input starts with those dimensions,
padding tokens are left out. The model runs in eval mode without gradients and is left as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.distributed import is_distributed, max_across_ranks, sum_across_ranks
from ..core.inputs import call_model
from ..core.targets import Target

STATISTICS = ("input_sq_norm", "input_mean", "input_gram", "tokens")


class CalibrationError(ValueError):
    """A calibration batch could not be run through the model."""


def _channels_last(x: torch.Tensor, target: Target) -> torch.Tensor:
    """The layer input as (tokens, channels)."""
    if target.handler.output_channel_dim == -1 or x.dim() < 3:
        return x.reshape(-1, x.shape[-1])
    return x.movedim(1, -1).reshape(-1, x.shape[1])


@torch.no_grad()
def collect_statistics(
    model: nn.Module, targets: Sequence[Target], calibration: Iterable[Any], names: Sequence[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """``{target full name: {statistic: tensor}}`` over every batch of ``calibration`` (read once).

    Raises :class:`CalibrationError` naming the batch and what the model raised, and ``ValueError``
    for unknown statistic names or an empty ``calibration``.
    """
    unknown = [n for n in names if n not in STATISTICS]
    if unknown:
        raise ValueError(f"unknown calibration statistics {unknown}; known ones are {list(STATISTICS)}")
    stats: dict[str, dict[str, torch.Tensor]] = {t.full_name: {} for t in targets}
    padding: list[torch.Tensor | None] = [None]

    def recorder(target: Target):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0].detach()
            keep = padding[0]
            if keep is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(keep.shape):
                x = x[keep.to(x.device)]
            rows = _channels_last(x, target).float()
            found = stats[target.full_name]
            _add(found, "tokens", torch.tensor(float(rows.shape[0])))
            if "input_sq_norm" in names:
                _add(found, "input_sq_norm", rows.square().sum(0))
            if "input_mean" in names:
                _add(found, "input_sum", rows.sum(0))
            if "input_gram" in names:
                _add(found, "input_gram", rows.T @ rows)

        return hook

    handles = [t.module.register_forward_pre_hook(recorder(t)) for t in targets]
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()
    batches = 0
    try:
        for index, batch in enumerate(calibration):
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            padding[0] = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            try:
                call_model(model, batch)
            except Exception as error:
                raise CalibrationError(
                    f"calibration batch {index} failed in the model ({type(error).__name__}: {error}); "
                    "each batch must be what the model accepts: a tensor, a tuple of positional inputs or a "
                    "dict of keyword inputs"
                ) from error
            batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in was_training:
            module.training = training
    if max_across_ranks(batches) == 0:
        raise ValueError("calibration= gave no batches; pass a list of batches the model accepts")
    if is_distributed():  # every rank calibrated on its own batches: sum them, so all ranks agree
        _sum_across_ranks(stats, targets, names)
    for found in stats.values():
        if "input_sum" in found:
            found["input_mean"] = found.pop("input_sum") / found["tokens"].clamp(min=1)
    return stats


def _sum_across_ranks(
    stats: dict[str, dict[str, torch.Tensor]], targets: Sequence[Target], names: Sequence[str]
) -> None:
    """Sum every statistic over the ranks; a layer that a rank's batches never reached counts zeros
    there (its channel count is taken from the ranks that did see it)."""
    kept = ["tokens"] + [{"input_mean": "input_sum"}.get(n, n) for n in names if n != "tokens"]
    # Only the ranks that saw a layer contribute its channel count (the same on each of them).
    channels = torch.tensor([_channels_seen(stats[t.full_name]) for t in targets], dtype=torch.float64)
    seen = torch.tensor([float("tokens" in stats[t.full_name]) for t in targets], dtype=torch.float64)
    sum_across_ranks([channels, seen])
    tensors = []
    for target, total, ranks in zip(targets, channels.tolist(), seen.tolist()):
        found, width = stats[target.full_name], round(total / ranks) if ranks else 0
        for name in kept:
            if name not in found:
                shape = {"tokens": (), "input_gram": (width, width)}.get(name, (width,))
                found[name] = torch.zeros(shape, device=target.param.device)
            tensors.append(found[name])
    sum_across_ranks(tensors)


def _channels_seen(found: dict[str, torch.Tensor]) -> int:
    for name in ("input_sq_norm", "input_sum", "input_gram"):
        if name in found:
            return found[name].shape[0]
    return 0


def _add(found: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    total = found.get(name)
    found[name] = value.clone() if total is None else total.add_(value)
