"""Calibration statistics: the one implementation of the per-layer input statistics that data-aware
criteria and the one-shot methods read, and the shared calibration pass of the pruner.

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

:class:`LayerStatistics` keeps the running sums of one layer (count, Σx, Σx², XᵀX, each only when
asked for) and derives the rest: ‖X_j‖₂, E[X_j], the population variance Var(X_j) (FLAP's
fluctuation, An et al. 2024) and SparseGPT's H = 2XᵀX / n. :class:`InputRecorder` feeds it from forward
pre-hooks; :func:`collect_statistics` is the pruner's pass over ``calibration=`` batches, and the
one-shot methods (:mod:`prunekit.oneshot`) record the same statistics block by block or model-wide.

Channels are the layer's input features: the last dimension for Linear-like layers (a layer whose
handler has ``output_channel_dim == -1``, or no handler), dimension 1 for convolutions
(:func:`input_rows`). When a batch is a dict with an ``attention_mask`` of shape (batch, tokens)
(:func:`token_mask`) and a Linear-like layer's input starts with those dimensions, padding tokens are
left out. Under ``torch.distributed`` the sums of every rank are added (:func:`sum_across_ranks`), so
all ranks agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core import distributed
from ..core.inputs import call_model
from ..core.layers import handler_for
from ..core.targets import Target

STATISTICS = ("input_sq_norm", "input_mean", "input_gram", "tokens")


class CalibrationError(ValueError):
    """A calibration batch the model rejected, or calibration data that cannot be used."""


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the layers of interest have run."""


def run_batch(model: nn.Module, batch: Any, index: int) -> Any:
    """Run one calibration batch; a model error becomes a :class:`CalibrationError` naming the batch
    and what the model raised (:class:`StopForward` passes through)."""
    try:
        return call_model(model, batch)
    except StopForward:
        raise
    except Exception as error:
        raise CalibrationError(
            f"calibration batch {index} was rejected by the model: {type(error).__name__}: {error} (each batch "
            "must be what the model accepts: a tensor, a tuple of positional inputs or a dict of keyword inputs, "
            "passed as model(batch), model(*batch) or model(**batch))"
        ) from error


def token_mask(batch: Any) -> torch.Tensor | None:
    """The batch's 2-D ``attention_mask`` as bool (True = real token), or None."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.bool()
    return None


def channels_last(module: nn.Module) -> bool:
    """True when ``module``'s input channels are its input's last dimension (Linear-like layers, HF
    Conv1D, unregistered types); False for convolutions (channels in dimension 1)."""
    handler = handler_for(module)
    return handler is None or handler.output_channel_dim == -1


def input_rows(x: torch.Tensor, last: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A layer input as a (positions, channels) matrix; ``last``: :func:`channels_last` of the layer.

    With a token ``mask`` (batch, tokens) matching the input's first two dimensions, the rows of
    padding tokens are dropped (Linear-like layers only: a convolution's dimension 1 is channels).
    """
    if last or x.dim() < 3:
        if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.to(x.device)]
        return x.reshape(-1, x.shape[-1])
    return x.movedim(1, -1).reshape(-1, x.shape[1])


class LayerStatistics:
    """Running sums over the input positions of one layer, per input channel.

    Collects ``sq_norm`` (Σ x_j²), ``sum`` (Σ x_j, for the mean and variance) and ``gram`` (XᵀX) as
    asked, in ``dtype`` (float32 for Wanda / SparseGPT, float64 for the structured path), on the
    device of the first rows added. :attr:`tokens` counts the rows (tokens or positions).
    """

    def __init__(self, *, sq_norm: bool = True, sum: bool = False, gram: bool = False, dtype=torch.float32):
        self.wants = {"sq_norm": sq_norm, "sum": sum, "gram": gram}
        self.dtype = dtype
        self.tokens = 0
        self.sq_norm: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    @property
    def width(self) -> int:
        """Number of input channels seen (0 before any rows were added)."""
        for value in (self.sq_norm, self.sum, self.gram):
            if value is not None:
                return value.shape[0]
        return 0

    def allocate(self, width: int, device: torch.device | str | None = None) -> None:
        """Create the zero sums for ``width`` channels (a no-op once they exist)."""
        if self.width:
            return
        zeros = lambda *shape: torch.zeros(*shape, dtype=self.dtype, device=device)  # noqa: E731
        self.sq_norm = zeros(width) if self.wants["sq_norm"] else None
        self.sum = zeros(width) if self.wants["sum"] else None
        self.gram = zeros(width, width) if self.wants["gram"] else None

    def add(self, rows: torch.Tensor) -> None:
        """Add the rows of a (positions, channels) matrix."""
        values = rows.detach().to(self.dtype)
        self.allocate(values.shape[1], values.device)
        for name in ("sq_norm", "sum", "gram"):  # sums follow the rows (an offloaded model moves them)
            current = getattr(self, name)
            if current is not None and current.device != values.device:
                setattr(self, name, current.to(values.device))
        if self.sq_norm is not None:
            self.sq_norm += values.square().sum(0)
        if self.sum is not None:
            self.sum += values.sum(0)
        if self.gram is not None:
            self.gram.addmm_(values.t(), values)
        self.tokens += values.shape[0]

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration positions."""
        return self.sq_norm.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        """E[X_j]."""
        return self.sum / max(self.tokens, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Var(X_j) (population variance, clamped at 0 against rounding)."""
        return (self.sq_norm / max(self.tokens, 1) - self.mean.square()).clamp(min=0)

    def hessian(self) -> torch.Tensor:
        """SparseGPT's H = 2 XᵀX / n, scaled in place: the accumulated XᵀX is consumed."""
        return self.gram.mul_(2.0 / max(self.tokens, 1))

    def as_dict(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The statistics of :data:`STATISTICS` named in ``names`` (``tokens`` always), as tensors."""
        found = {"tokens": torch.tensor(float(self.tokens))}
        if "input_sq_norm" in names and self.sq_norm is not None:
            found["input_sq_norm"] = self.sq_norm
        if "input_mean" in names and self.sum is not None:
            found["input_mean"] = self.mean
        if "input_gram" in names and self.gram is not None:
            found["input_gram"] = self.gram
        return found


def sum_across_ranks(statistics: Sequence[LayerStatistics], devices: Sequence[torch.device | None]) -> None:
    """Add every layer's sums over the ranks, in place (every rank passes the same layers in the same
    order). A layer that a rank's batches never reached counts zeros there, on ``devices[i]``, with the
    channel count of the ranks that did see it. Outside a distributed run, nothing happens."""
    if not distributed.is_distributed():
        return
    widths = torch.tensor([float(s.width) for s in statistics], dtype=torch.float64)
    seen = torch.tensor([float(s.width > 0) for s in statistics], dtype=torch.float64)
    tokens = torch.tensor([float(s.tokens) for s in statistics], dtype=torch.float64)
    distributed.sum_across_ranks([widths, seen, tokens])
    tensors = []
    for stats, width, ranks, total, device in zip(statistics, widths.tolist(), seen.tolist(), tokens.tolist(), devices):
        if not ranks:
            continue
        stats.allocate(round(width / ranks), device)
        stats.tokens = round(total)
        tensors += [t for t in (stats.sq_norm, stats.sum, stats.gram) if t is not None]
    distributed.sum_across_ranks(tensors)


class InputRecorder:
    """Forward pre-hooks adding each watched layer's input rows to its :class:`LayerStatistics`.

    ``layers``: ``{name: module}``; ``make``: a fresh :class:`LayerStatistics` per layer. Set :attr:`mask`
    to the current batch's :func:`token_mask` before each forward pass. A module called several times
    per batch adds every call; a call whose first positional input is not a tensor adds nothing.
    """

    def __init__(self, layers: Mapping[str, nn.Module], make):
        self.statistics: dict[str, LayerStatistics] = {name: make() for name in layers}
        self.mask: torch.Tensor | None = None
        self.handles = [module.register_forward_pre_hook(self._hook(name, module)) for name, module in layers.items()]

    def _hook(self, name: str, module: nn.Module):
        last, stats = channels_last(module), self.statistics[name]

        def hook(_module, args):
            if args and isinstance(args[0], torch.Tensor):
                stats.add(input_rows(args[0].detach(), last, self.mask))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@torch.no_grad()
def collect_statistics(
    model: nn.Module, targets: Sequence[Target], calibration: Iterable[Any], names: Sequence[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """``{target full name: {statistic: tensor}}`` over every batch of ``calibration`` (read once), in
    float32. The model runs in eval mode without gradients and is left as it was.

    Raises :class:`CalibrationError` naming the batch and what the model raised, and ``ValueError``
    for unknown statistic names or an empty ``calibration``.
    """
    unknown = [n for n in names if n not in STATISTICS]
    if unknown:
        raise ValueError(f"unknown calibration statistics {unknown}; known ones are {list(STATISTICS)}")
    wants = dict(sq_norm="input_sq_norm" in names, sum="input_mean" in names, gram="input_gram" in names)
    layers = {t.full_name: t.module for t in targets}
    recorder = InputRecorder(layers, lambda: LayerStatistics(**wants))
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()
    batches = 0
    try:
        for index, batch in enumerate(calibration):
            recorder.mask = token_mask(batch)
            run_batch(model, batch, index)
            batches += 1
    finally:
        recorder.remove()
        for module, training in was_training:
            module.training = training
    if distributed.max_across_ranks(batches) == 0:
        raise ValueError("calibration= gave no batches; pass a list of batches the model accepts")
    stats = recorder.statistics
    sum_across_ranks([stats[t.full_name] for t in targets], [t.param.device for t in targets])
    return {t.full_name: stats[t.full_name].as_dict(names) for t in targets}
