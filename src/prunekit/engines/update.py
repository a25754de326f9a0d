"""A mask update: the new masks an engine proposes, before anything on the model changes."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from ..core import masks as mask_store
from ..core.targets import Target

#: Identifies one maskable tensor: (module, parameter name, model-level name).
MaskKey = tuple[nn.Module, str, str]


@dataclass
class MaskUpdate:
    """New bit-packed keep-masks, each already intersected with the tensor's old mask (masks only grow).

    ``packed``: ``{key: bit-packed mask}`` (see :func:`prunekit.core.masks.pack_mask`) for every tensor
    whose mask changes, except those in ``magnitude_cuts``, whose new mask is "|w| > t, plus the
    protected flat positions" as ``{key: (t, protected positions or None)}``: for those, zeroing the
    weights first and reading the mask off them is cheaper than building the mask.
    """

    packed: dict[MaskKey, torch.Tensor] = field(default_factory=dict)
    magnitude_cuts: dict[MaskKey, tuple[float, torch.Tensor | None]] = field(default_factory=dict)
    #: The bool form of some packed masks, when the engine had it at hand (saves unpacking them again).
    unpacked: dict[MaskKey, torch.Tensor] = field(default_factory=dict)
    #: Structured masks as per-dimension keep vectors: zeroing reads them instead of a whole mask.
    separable: dict[MaskKey, mask_store.SeparableMask] = field(default_factory=dict)

    def add_packed(
        self, module: nn.Module, param_name: str, full_name: str, packed: torch.Tensor, keep: torch.Tensor | None = None
    ) -> None:
        """Record ``module.<param_name>``'s new packed mask, intersected with its old one; ``keep`` is
        the same mask unpacked (bool, the tensor's shape), if the caller has it."""
        key = (module, param_name, full_name)
        old = module._buffers.get(mask_store.mask_buffer_name(param_name))
        if old is not None:
            packed &= old.to(packed.device)
            keep = None  # the intersection is only packed
        self.packed[key] = packed.to(getattr(module, param_name).device)
        self.separable.pop(key, None)
        if keep is not None:
            self.unpacked[key] = keep
        else:
            self.unpacked.pop(key, None)

    def add_separable(self, module: nn.Module, param_name: str, full_name: str, mask: mask_store.SeparableMask) -> None:
        """Record ``module.<param_name>``'s new mask given as per-dimension keep vectors (intersected with
        its old mask, when it has one, in packed form only)."""
        self.add_packed(module, param_name, full_name, mask.packed())
        if mask_store.mask_buffer_name(param_name) not in module._buffers:
            self.separable[(module, param_name, full_name)] = mask

    def add(self, target: Target, keep_oik: torch.Tensor, prunes_bias: bool) -> None:
        """Record a target's new ``(O, I, K)`` keep mask and, when ``prunes_bias`` and units are whole
        outputs, the mask of the bias entries of outputs that lose all their weights."""
        packed = mask_store.pack_mask(target.from_oik(keep_oik))
        self.add_packed(target.module, target.param_name, target.full_name, packed)
        bias = target.bias
        if prunes_bias and bias is not None and bias.numel() == keep_oik.shape[0]:
            bias_keep = keep_oik.reshape(keep_oik.shape[0], -1).any(dim=1)
            self.add_packed(
                target.module, target.bias_name, target.name_of(target.bias_name), mask_store.pack_mask(bias_keep)
            )

    def proposed_keep(self, target: Target, current: torch.Tensor | None) -> torch.Tensor | None:
        """The target weight's keep mask after this update (``current`` if the update leaves it alone;
        a magnitude cut is read off the weight, which it has not zeroed yet)."""
        key = (target.module, target.param_name, target.full_name)
        packed = self.packed.get(key)
        if packed is not None:
            return mask_store.unpack_mask(packed, target.param.shape)
        cut = self.magnitude_cuts.get(key)
        if cut is not None:
            threshold, protected = cut
            keep = (target.param.detach().abs() > threshold).reshape(-1)
            if protected is not None:
                keep[protected] = True
            if current is not None:
                keep &= current.reshape(-1)
            return keep.reshape(target.param.shape)
        return current

    def __len__(self) -> int:
        return len(self.packed) + len(self.magnitude_cuts)


class ScratchBuffers:
    """Scratch buffers for building the masks of layers up to ``size`` units, reused layer after
    layer and each allocated when first used; all None when ``size`` is 0 (small models, where
    fresh memory costs nothing)."""

    def __init__(self, size: int):
        self.size = size

    @cached_property
    def scores(self) -> torch.Tensor | None:
        return torch.empty(self.size) if self.size else None

    @cached_property
    def flags(self) -> torch.Tensor | None:
        return torch.empty(self.size, dtype=torch.bool) if self.size else None

    @cached_property
    def words(self) -> torch.Tensor | None:
        return torch.empty((self.size + 7) // 8, dtype=torch.int64) if self.size else None
