"""The pruner's state dict: masks (bit-packed), step, schedule position, criterion state, rewind point
and the configuration it was built with. :func:`read_state` validates a saved state completely and
returns it parsed, before the pruner changes anything, so a bad state leaves model and pruner as they were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core import masks as mask_store
from ..core.config import PruningConfig
from ..core.sharding import gather_rows, is_sharded, local_tensor
from .update import MaskKey

STATE_VERSION = 2
#: Versions :func:`read_state` reads (version 1 stored its configuration as repr() strings).
READABLE_VERSIONS = (1, 2)


@dataclass
class SavedState:
    """A validated saved state, ready to apply."""

    masks: dict[str, tuple[nn.Module, str, torch.Tensor]]
    step: int
    last_event: int
    criterion: dict[str, Any]
    rewind_step: int | None
    rewind_state: dict[str, torch.Tensor] | None


def write_state(
    maskable: list[MaskKey],
    config: PruningConfig,
    step: int,
    last_event: int,
    criterion_state: dict[str, Any],
    rewind_step: int | None,
    rewind_state: dict[str, torch.Tensor] | None,
) -> dict[str, Any]:
    """Everything needed to resume; save it next to ``model.state_dict()``. Masks of FSDP2-sharded
    parameters are gathered whole (a collective: every rank calls this)."""
    masks, shapes = {}, {}
    for module, param_name, full_name in maskable:
        packed = module._buffers.get(mask_store.mask_buffer_name(param_name))
        if packed is not None:
            param = getattr(module, param_name)
            if is_sharded(param):  # FSDP2: every rank's rows, so the saved mask is the whole one
                whole = gather_rows(mask_store.unpack_mask(packed, local_tensor(param).shape), param)
                packed = mask_store.pack_mask(whole)
            masks[full_name] = packed.clone()
            shapes[full_name] = tuple(param.shape)
    return {
        "version": STATE_VERSION,
        "step": step,
        "last_event": last_event,
        "masks": masks,
        "shapes": shapes,
        "criterion": criterion_state,
        "rewind_step": rewind_step,
        "rewind_state": rewind_state,
        "config": config.to_dict(),
    }


def _whole(state: Mapping[str, Any], key: str, minimum: int) -> int:
    if key not in state:
        raise ValueError(f"the saved pruner state has no {key!r}; save it with pruner.state_dict()")
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"the saved pruner state has a bad {key!r}: {value!r} (a whole number ≥ {minimum})")
    return value


def read_state(
    state: Any, maskable: list[MaskKey], config: PruningConfig, check_config: bool, model_state_names: set[str]
) -> SavedState:
    """Validate ``state`` against this pruner (its maskable tensors and configuration) and parse it.

    Raises ``ValueError`` naming what is wrong: not a pruner state, another configuration (the
    differing fields; ``check_config=False`` accepts it), a mask this pruner does not prune or of
    another shape, a missing or bad step, event or rewind point.
    """
    if not isinstance(state, Mapping) or state.get("version") not in READABLE_VERSIONS:
        raise ValueError("not a prunekit Pruner state_dict (missing or unknown 'version')")
    step = _whole(state, "step", 0)
    last_event = _whole(state, "last_event", -1)
    known = {full_name: (module, param_name) for module, param_name, full_name in maskable}
    masks = state.get("masks")
    if not isinstance(masks, Mapping):
        raise ValueError("the saved pruner state has no 'masks' dict")
    unpacked = {}
    for full_name, packed in masks.items():
        if full_name not in known:
            raise ValueError(
                f"the saved masks name {full_name!r}, which this pruner does not prune; "
                "build the pruner with the same model, include/exclude and granularity"
            )
        module, param_name = known[full_name]
        shape = getattr(module, param_name).shape
        saved_shape = tuple(state.get("shapes", {}).get(full_name, shape))
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
            raise ValueError(f"the saved mask of {full_name!r} is not a bit-packed uint8 tensor")
        if saved_shape != tuple(shape) or packed.numel() != (math.prod(shape) + 7) // 8:
            raise ValueError(
                f"the saved mask of {full_name!r} has shape {saved_shape}, but that parameter has shape "
                f"{tuple(shape)}; load it into a pruner built on the same architecture"
            )
        unpacked[full_name] = (module, param_name, mask_store.unpack_mask(packed.cpu(), shape))
    saved_config = state.get("config")
    if check_config and state["version"] >= 2:
        try:
            differences = config.differences(PruningConfig.from_dict(saved_config))
        except (TypeError, ValueError) as error:
            raise ValueError(f"the saved pruner state has an unreadable configuration: {error}") from None
        if differences:
            raise ValueError(
                "the saved pruner state was made with another configuration ("
                + "; ".join(f"{d} (this pruner → saved)" if i == 0 else d for i, d in enumerate(differences))
                + "); build the pruner with the saved configuration, or pass check_config=False to load it anyway"
            )
    rewind_step = state.get("rewind_step")
    if rewind_step is not None and (
        isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0
    ):
        raise ValueError(f"the saved pruner state has a bad 'rewind_step': {rewind_step!r}")
    rewind = state.get("rewind_state")
    if rewind is not None:
        if not isinstance(rewind, Mapping) or not all(isinstance(v, torch.Tensor) for v in rewind.values()):
            raise ValueError("the saved pruner state has a bad 'rewind_state' (a dict of tensors)")
        stray = sorted(set(rewind) - model_state_names)
        if stray:
            raise ValueError(f"the saved rewind point names tensors this model does not have: {stray[:5]}")
        rewind = {k: v.clone() for k, v in rewind.items()}
    criterion = state.get("criterion", {})
    if not isinstance(criterion, Mapping):
        raise ValueError("the saved pruner state has a bad 'criterion' entry (a dict)")
    return SavedState(unpacked, step, last_event, dict(criterion), rewind_step, rewind)
