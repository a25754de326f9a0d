"""Calibration for the sequential path: reading the user's batches and capturing a block's inputs.

A calibration batch is whatever the model accepts (a tensor, a tuple of positional inputs, or a dict of
keyword inputs, as :func:`prunekit.core.inputs.call_model` passes them). The iterable is read once. The
per-Linear statistics of each block (Wanda's Σ X_j², SparseGPT's XᵀX, padding tokens left out) are
:class:`prunekit.engines.calibration.LayerStatistics`, recorded while the block runs on the captured
inputs (:mod:`.blocks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engines.calibration import CalibrationError, StopForward, run_batch, token_mask

__all__ = ["BlockInputs", "CalibrationError", "capture_inputs", "read_batches", "to_device", "token_mask"]


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
        raise StopForward  # nothing after the first block needs to run

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        if use_cache is not None:
            config.use_cache = False
        for index, batch in enumerate(batches):
            try:
                run_batch(model, batch, index)
            except StopForward:
                pass
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
