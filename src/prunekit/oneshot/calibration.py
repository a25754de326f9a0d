"""Calibration: reading the user's batches, capturing a block's inputs, collecting per-Linear statistics.

A calibration batch is whatever the model accepts (a tensor, a tuple of positional inputs, or a dict of
keyword inputs, as :func:`prunekit.structure.dependencies.call_model` passes them). The iterable is read
once. Statistics are streamed over batches and tokens; when a batch carries a 2-D ``attention_mask``,
padding tokens are left out of them (they carry no signal, and padded batches would otherwise weigh
pad embeddings as much as words).

Two statistics are collected, on the inputs X (tokens × in_features) of each pruned Linear:

- ``sq_norms``: Σ_tokens X_j², per input channel j (Wanda's ‖X_j‖₂², Sun et al. 2023);
- ``hessian``: H = 2 XᵀX / n over n tokens (SparseGPT's layer-wise Hessian, Frantar & Alistarh 2023),
  accumulated in float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..structure.dependencies import call_model


class CalibrationError(ValueError):
    """A calibration batch the model rejected, or calibration data that cannot be used."""


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first block needs to run."""


def read_batches(calibration: Any) -> list[Any]:
    """Read the calibration iterable once into a list of batches (references, not copies)."""
    if calibration is None:
        raise CalibrationError("calibration is None")
    if isinstance(calibration, (torch.Tensor, Mapping)):
        raise CalibrationError(
            "calibration must be an iterable of batches (e.g. a list of tokenizer outputs or tensors), "
            f"got a single {type(calibration).__name__}; wrap it in a list: calibration=[batch]"
        )
    if not isinstance(calibration, Iterable):
        raise CalibrationError(f"calibration must be an iterable of batches, got {type(calibration).__name__}")
    batches = list(calibration)
    if not batches:
        raise CalibrationError("calibration is empty: pass at least one batch")
    return batches


def token_mask(batch: Any) -> torch.Tensor | None:
    """The batch's 2-D ``attention_mask`` as bool (True = real token), or None."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.bool()
    return None


def to_device(value: Any, device: torch.device | str | None) -> Any:
    """Move every tensor in nested tuples/lists/dicts to ``device`` (None: leave them)."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@dataclass
class BlockInputs:
    """The positional and keyword inputs one block received for each calibration batch."""

    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)


def _no_cache(kwargs: dict) -> dict:
    # A block must not build or read a key/value cache: calibration batches are unrelated sequences.
    kwargs = dict(kwargs)
    for key in ("past_key_value", "past_key_values", "layer_past", "cache"):
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


@torch.no_grad()
def capture_inputs(model: nn.Module, block: nn.Module, batches: list[Any], storage: str | None) -> BlockInputs:
    """Run the model on every batch up to ``block`` and return what ``block`` received.

    ``storage``: device the captured tensors are kept on (``"cpu"`` to offload them; None: where they are).
    Raises :class:`CalibrationError` naming the batch the model rejected and what it raised, and when a
    batch never reaches ``block``.
    """
    captured = BlockInputs()

    def grab(module, args, kwargs):
        captured.args.append(to_device(args, storage))
        captured.kwargs.append(to_device(_no_cache(kwargs), storage))
        raise _StopForward

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        if use_cache is not None:
            config.use_cache = False
        for index, batch in enumerate(batches):
            try:
                call_model(model, batch)
            except _StopForward:
                pass
            except Exception as err:
                raise CalibrationError(
                    f"calibration batch {index} was rejected by the model: {type(err).__name__}: {err} "
                    "(a batch is passed as model(batch), model(*batch) for a tuple, or model(**batch) for a dict)"
                ) from err
            if len(captured.args) != index + 1:
                raise CalibrationError(
                    f"calibration batch {index} ran through the model without reaching its first block; "
                    "name the blocks with blocks= (the path of the nn.ModuleList the model runs)"
                )
            captured.masks.append(token_mask(batch))
    finally:
        handle.remove()
        if use_cache is not None:
            config.use_cache = use_cache
    return captured


def linear_inputs(inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A Linear's input as (tokens, in_features) float32, padding tokens dropped when ``mask`` fits."""
    if mask is not None and inputs.dim() == 3 and tuple(inputs.shape[:2]) == tuple(mask.shape):
        inputs = inputs[mask.to(inputs.device)]
    return inputs.reshape(-1, inputs.shape[-1]).float()


class LinearStats:
    """Streams Wanda's Σ X_j² and/or SparseGPT's XᵀX over the inputs of one Linear (forward hook).

    Set :attr:`mask` to the current batch's token mask before each call of the block.
    """

    def __init__(self, module: nn.Module, in_features: int, *, sq_norms: bool, hessian: bool):
        self.module = module
        self.tokens = 0
        self.mask: torch.Tensor | None = None
        self.sq_norms = torch.zeros(in_features) if sq_norms else None
        self.xtx = torch.zeros(in_features, in_features) if hessian else None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        x = linear_inputs(args[0].detach(), self.mask)
        if self.sq_norms is not None:
            if self.sq_norms.device != x.device:
                self.sq_norms = self.sq_norms.to(x.device)
            self.sq_norms += x.pow(2).sum(0)
        if self.xtx is not None:
            if self.xtx.device != x.device:
                self.xtx = self.xtx.to(x.device)
            self.xtx.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2 XᵀX / n (float32), scaled in place: the accumulated XᵀX is consumed."""
        return self.xtx.mul_(2.0 / max(self.tokens, 1))

    def remove(self) -> None:
        self.handle.remove()
