"""The calibration pass of structured one-shot pruning: per-input-channel statistics of the watched
layers (:class:`prunekit.engines.calibration.LayerStatistics` in float64: the count N, Σ x_j, Σ x_j²,
hence ‖X_j‖₂ for Wanda, Sun et al. 2023, the mean E[X_j] for FLAP's bias compensation and the variance
Var(X_j) for FLAP's fluctuation, An et al. 2024), over every calibration position (tokens of every
sequence, padding tokens left out as everywhere in prunekit; pixels of every image).

It also records the order in which layers are first called, how often each is called per batch, and
which layers feed a BatchNorm directly (their output is that norm's input), which is where a layer
without a bias can take a bias correction exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engines.calibration import (
    CalibrationError,
    InputRecorder,
    LayerStatistics,
    StopForward,
    channels_last,
    input_rows,
    run_batch,
    token_mask,
)

__all__ = [
    "CalibrationError",
    "CalibrationRecord",
    "StopForward",
    "as_batches",
    "collect_statistics",
    "eval_mode",
    "input_channels",
    "run_batch",
]


@dataclass
class CalibrationRecord:
    """What one pass over the calibration batches saw."""

    #: The statistics of every watched layer that was called on a tensor, in float64.
    statistics: dict[str, LayerStatistics] = field(default_factory=dict)
    #: Watched layer names in the order they were first called.
    call_order: list[str] = field(default_factory=list)
    #: ``calls[name][b]``: how many times the layer ran on batch b.
    calls: dict[str, list[int]] = field(default_factory=dict)
    #: Layers whose every output went straight into this BatchNorm.
    batchnorm_after: dict[str, nn.Module] = field(default_factory=dict)
    #: ``masks[b]``: batch b's token mask (:func:`prunekit.engines.calibration.token_mask`), or None.
    masks: list[torch.Tensor | None] = field(default_factory=list)


def input_channels(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's input as a (positions, channels) matrix (:func:`prunekit.engines.calibration.input_rows`),
    padding tokens dropped when ``mask`` fits."""
    return input_rows(x, channels_last(module), mask)


class eval_mode:
    """Run the model in eval mode without gradients, restoring every module's train flag afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = {module: module.training for module in self.model.modules()}
        self.model.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()
        return self

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        for module, training in self.flags.items():
            module.training = training
        return False


def collect_statistics(model: nn.Module, batches: list[Any], layers: Mapping[str, nn.Module]) -> CalibrationRecord:
    """One pass over ``batches`` (eval mode, no gradients) recording the statistics of ``layers``
    (``{name: module}``); the model is left as it was, hooks removed, whatever happens."""
    record = CalibrationRecord()
    names = {module: name for name, module in layers.items()}
    current = {name: 0 for name in layers}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    fed: dict[str, set] = {}

    def before(module, args):
        name = names[module]
        if name not in seen:
            seen.add(name)
            record.call_order.append(name)
        current[name] += 1

    def after(module, args, output):
        if norms_present and isinstance(output, torch.Tensor):
            outputs[id(output)] = (names[module], output)
            fed.setdefault(names[module], set())

    def norm_input(module, args):
        if args and isinstance(args[0], torch.Tensor):
            found = outputs.get(id(args[0]))
            if found is not None and found[1] is args[0]:
                fed[found[0]].add(module)

    seen: set[str] = set()
    norms_present = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    handles = []
    recorder = None
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
        recorder = InputRecorder({name: module for module, name in names.items()}, _float64_sums)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                handles.append(module.register_forward_pre_hook(norm_input))
        with eval_mode(model):
            for index, batch in enumerate(batches):
                record.masks.append(token_mask(batch))
                recorder.mask = record.masks[-1]
                run_batch(model, batch, index)
                outputs.clear()  # outputs are held only until the batch ends, to compare identities
                for name in layers:
                    record.calls.setdefault(name, []).append(current[name])
                    current[name] = 0
    finally:
        for handle in handles:
            handle.remove()
        if recorder is not None:
            recorder.remove()
    record.statistics = {name: recorder.statistics[names[layers[name]]] for name in record.call_order}
    record.statistics = {name: stats for name, stats in record.statistics.items() if stats.width}
    for name, norms in fed.items():
        if len(norms) == 1:
            record.batchnorm_after[name] = next(iter(norms))
    return record


def _float64_sums() -> LayerStatistics:
    return LayerStatistics(sq_norm=True, sum=True, dtype=torch.float64)


def as_batches(calibration: Iterable | None) -> list[Any]:
    """Read ``calibration`` once into a list of batches (a single tensor or dict counts as one batch)."""
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, Mapping)):
        return [calibration]
    try:
        return list(calibration)
    except TypeError:
        raise TypeError(
            f"calibration must be an iterable of batches the model accepts, got {type(calibration).__name__}"
        ) from None
