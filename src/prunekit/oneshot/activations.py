"""Per-input-channel statistics of a model's layers over calibration batches (forward hooks).

For every watched layer this records, per input channel j of the layer (a Linear's input feature, a
convolution's input channel), over all calibration positions (tokens of every sequence, pixels of
every image): the count N, Σ x_j and Σ x_j². From them: ‖X_j‖₂ (Wanda, Sun et al. 2023), the mean
E[X_j] (FLAP's bias compensation) and the variance Var(X_j) (FLAP's fluctuation, An et al. 2024).

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

from ..core.inputs import call_model
from ..core.targets import is_hf_conv1d


class CalibrationError(ValueError):
    """A calibration batch the model could not run."""


@dataclass
class ChannelStatistics:
    """Running per-input-channel sums of one layer, in float64 on the layer's device."""

    count: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def add(self, channels: torch.Tensor) -> None:
        """Add rows of a (positions, channels) matrix."""
        values = channels.detach().double()
        if self.total is None:
            self.total = torch.zeros(values.shape[1], dtype=torch.float64, device=values.device)
            self.squares = torch.zeros_like(self.total)
        self.count += values.shape[0]
        self.total += values.sum(dim=0)
        self.squares += values.square().sum(dim=0)

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration positions."""
        return self.squares.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        """E[X_j]."""
        return self.total / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Var(X_j) (population variance, clamped at 0 against rounding)."""
        return (self.squares / max(self.count, 1) - self.mean.square()).clamp(min=0)


@dataclass
class CalibrationRecord:
    """What one pass over the calibration batches saw."""

    statistics: dict[str, ChannelStatistics] = field(default_factory=dict)
    #: Watched layer names in the order they were first called.
    call_order: list[str] = field(default_factory=list)
    #: ``calls[name][b]``: how many times the layer ran on batch b.
    calls: dict[str, list[int]] = field(default_factory=dict)
    #: Layers whose every output went straight into this BatchNorm.
    batchnorm_after: dict[str, nn.Module] = field(default_factory=dict)


def input_channels(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as a (positions, channels) matrix: Linear / HF Conv1D inputs (..., C), and
    convolution inputs (N, C, *spatial)."""
    if isinstance(module, nn.modules.conv._ConvNd) and not is_hf_conv1d(module):
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def run_batch(model: nn.Module, batch: Any, index: int) -> Any:
    """Run one calibration batch; a model error becomes a :class:`CalibrationError` naming the batch."""
    try:
        return call_model(model, batch)
    except StopForward:
        raise
    except Exception as error:
        raise CalibrationError(
            f"calibration batch {index} was rejected by the model: {type(error).__name__}: {error}. "
            "Each calibration batch must be what example_inputs accepts: a tensor, a tuple of positional "
            "inputs or a dict of keyword inputs (e.g. a tokenizer's output)"
        ) from error


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


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
        if name not in record.statistics:
            record.statistics[name] = ChannelStatistics()
            record.call_order.append(name)
        if args and isinstance(args[0], torch.Tensor):
            record.statistics[name].add(input_channels(module, args[0]))
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

    norms_present = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    handles = []
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                handles.append(module.register_forward_pre_hook(norm_input))
        with eval_mode(model):
            for index, batch in enumerate(batches):
                run_batch(model, batch, index)
                outputs.clear()  # outputs are held only until the batch ends, to compare identities
                for name in layers:
                    record.calls.setdefault(name, []).append(current[name])
                    current[name] = 0
    finally:
        for handle in handles:
            handle.remove()
    for name, norms in fed.items():
        if len(norms) == 1:
            record.batchnorm_after[name] = next(iter(norms))
    return record


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
