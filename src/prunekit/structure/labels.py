"""Label tensors: the channel id each element of a traced activation carries.

Beside every activation the tracer keeps a label tensor of the same shape. Labels are encoded as
``2·id + z``: ``id`` is a channel id (see :mod:`.channels`; −1 for plain data such as inputs and
constants), and ``z = 1`` says "this element is exactly zero when its channel is pruned". A layer that
consumes a channel whose value would *not* be zero (say ``sigmoid(x)`` or ``x + 1``) cannot drop it
exactly, so that channel is pinned. Plain data is labelled −1 (:data:`NONE`) whatever z would be.

Label tensors are often broadcast views (stride 0 along batch, token and pixel dimensions): the
helpers here work on one slice of those dimensions where they can.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .channels import PINNED

NONE = -1
PINNED_LABEL = 2 * PINNED  # id 0, not zero-preserving


def encode(ids: torch.Tensor, zero_ok: bool | torch.Tensor) -> torch.Tensor:
    """Labels ``2·id + z`` of channel ids (negative ids give :data:`NONE`)."""
    label = ids * 2
    label += zero_ok if isinstance(zero_ok, torch.Tensor) else int(bool(zero_ok))
    # A negative id gives 2·id + z ≤ −1: clamping maps it to NONE (one call, where torch.where needs three).
    return label.clamp_min_(NONE)


def ids_of(label: torch.Tensor) -> torch.Tensor:
    """The channel ids of labels (−1 stays −1: arithmetic shift)."""
    return label >> 1


def zero_ok_of(label: torch.Tensor) -> torch.Tensor:
    """Bool per element: a channel that is exactly zero where it is pruned."""
    return (label >= 0) & ((label & 1) == 1)


def not_zero_ok(label: torch.Tensor) -> torch.Tensor:
    """The same channels, marked as not zero where pruned (the result of an operation with f(0) ≠ 0)."""
    return torch.where(label >= 0, label & ~1, label)


def broadcast_dims(label: torch.Tensor) -> list[int]:
    """Dimensions along which a (broadcast) label tensor repeats one slice: stride 0, size > 1."""
    return [d for d, (stride, size) in enumerate(zip(label.stride(), label.shape)) if stride == 0 and size > 1]


def narrow_first(label: torch.Tensor, dims: Iterable[int]) -> torch.Tensor:
    """The first slice along each of ``dims`` (size 1 there): one strided view, where a narrow() per
    dimension costs a call each."""
    dims = set(dims)
    if not dims:
        return label
    shape = [1 if d in dims else size for d, size in enumerate(label.shape)]
    return label.as_strided(shape, label.stride(), label.storage_offset())


def unbroadcast(label: torch.Tensor) -> torch.Tensor:
    """One slice along every broadcast dimension (shape keeps size 1 there)."""
    return narrow_first(label, broadcast_dims(label))
