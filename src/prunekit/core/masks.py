"""Binary masks: how prunekit stores which weights are kept.

A mask M has the shape of the parameter it belongs to; ``True`` means *kept*. Pruning sets the pruned
weights to zero **in place** (f(x; M ⊙ W)), so the model never holds a second copy of its weights,
unlike ``torch.nn.utils.prune``, which keeps ``weight_orig`` plus a float mask and rebuilds the weight
in a forward pre-hook.

On the module the mask is stored bit-packed (one bit per weight) as a *non-persistent* buffer named
``_pk_mask_<param>``. Non-persistent means:

- it travels with ``copy.deepcopy``, ``pickle`` and ``torch.save(model)``;
- it is **not** part of ``model.state_dict()``, so the pruned weights load into a fresh instance of
  the same class with ``load_state_dict(strict=True)``; the masks themselves are saved and restored
  through :meth:`prunekit.Pruner.state_dict`.

A parameter sharded by FSDP2 (a ``DTensor``) has a mask of its local shard only: the rows this rank
holds (:mod:`prunekit.core.sharding`), so enforcement multiplies local tensors.

During training the pruner keeps an unpacked ``bool`` copy (one byte per weight) for fast
enforcement; see :class:`prunekit.Pruner`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .sharding import local_tensor

MASK_PREFIX = "_pk_mask_"

_BIT_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
# Multiplying 8 flag bytes (read as one little-endian int64) by this constant gathers the flags into
# the top byte, first flag in the most significant bit; no two partial products overlap, so no carries.
_GATHER_BITS = 0x8040201008040201 - (1 << 64)


def pack_mask(keep: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Pack a boolean tensor into a flat ``uint8`` tensor, 8 entries per byte (first entry in the
    most significant bit). The shape is not stored: pass it to :func:`unpack_mask`.

    ``scratch``, an ``int64`` buffer of at least ``ceil(numel / 8)`` entries, avoids a temporary of
    ``numel`` bytes (worth it in loops over large layers, where such temporaries fragment the heap).
    """
    flat = keep.reshape(-1)
    flat = flat.contiguous() if flat.dtype == torch.bool else flat != 0
    pad = (-flat.numel()) % 8
    if pad or flat.storage_offset() % 8:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.uint8).view(torch.int64)
    if scratch is None or scratch.device != words.device or scratch.numel() < words.numel():
        gathered = words * _GATHER_BITS
    else:
        gathered = torch.mul(words, _GATHER_BITS, out=scratch[: words.numel()])
    return gathered.bitwise_right_shift_(56).to(torch.uint8)


def unpack_mask(
    packed: torch.Tensor, shape: torch.Size | tuple[int, ...], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: return a ``bool`` tensor of ``shape``.

    ``out``, a ``uint8`` buffer of at least ``8 * packed.numel()`` bytes, is used instead of new memory.
    """
    numel = 1
    for size in shape:
        numel *= size
    shifts = _BIT_SHIFTS.to(packed.device)
    if out is None:
        bits = (packed.unsqueeze(1) >> shifts).bitwise_and_(1)
    else:
        bits = torch.bitwise_right_shift(packed.unsqueeze(1), shifts, out=out[: 8 * packed.numel()].view(-1, 8))
        bits.bitwise_and_(1)
    return bits.reshape(-1)[:numel].view(torch.bool).reshape(shape)


class SeparableMask:
    """A keep mask that is the AND of one ``bool`` keep vector per dimension (structured pruning: kept
    filters × kept input channels), packed and applied without building it entry by entry.

    The mask is split into rows (the entries of its leading dimensions) and a row pattern (the trailing
    ones), at the first split where a row holds a whole number of bytes: each packed row is then either
    zero or the one packed pattern, so packing costs one byte per eight entries, and zeroing is one
    product with the pattern plus filling the removed rows. Without such a split (or for a tensor that
    is not contiguous) the mask is built whole.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], factors: dict[int, torch.Tensor]):
        self.shape = tuple(int(size) for size in shape)
        if not factors or any(
            not 0 <= dim < len(self.shape) or keep.dtype != torch.bool or keep.numel() != self.shape[dim]
            for dim, keep in factors.items()
        ):
            raise ValueError(
                f"SeparableMask needs one bool keep vector per dimension of {self.shape}, got {sorted(factors)}"
            )
        self.factors = factors
        self.split = next(
            (split for split in range(1, len(self.shape) + 1) if math.prod(self.shape[split:]) % 8 == 0), None
        )

    def _product(self, dims: range) -> torch.Tensor | None:
        """The AND of the factors on ``dims``, broadcast over ``self.shape[dims]`` (None: all kept)."""
        found = None
        for dim in dims:
            if dim in self.factors:
                view = [1] * len(dims)
                view[dim - dims.start] = -1
                keep = self.factors[dim].reshape(view)
                found = keep if found is None else found & keep
        return None if found is None else found.expand(self.shape[dims.start : dims.stop])

    def _rows_and_pattern(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        split = self.split
        rows, pattern = self._product(range(split)), self._product(range(split, len(self.shape)))
        return (
            None if rows is None else rows.reshape(-1),
            None if pattern is None else pattern.reshape(-1),
        )

    def dense(self) -> torch.Tensor:
        """The mask as a ``bool`` tensor of ``shape`` (new memory)."""
        return self._product(range(len(self.shape))).contiguous()

    def packed(self) -> torch.Tensor:
        """:func:`pack_mask` of the mask."""
        if self.split is None:
            return pack_mask(self.dense())
        rows, pattern = self._rows_and_pattern()
        row_bytes = math.prod(self.shape[self.split :]) // 8
        device = next(iter(self.factors.values())).device
        packed_row = (
            torch.full((row_bytes,), 255, dtype=torch.uint8, device=device) if pattern is None else pack_mask(pattern)
        )
        if rows is None:
            return packed_row.repeat(math.prod(self.shape[: self.split]))
        return (rows.reshape(-1, 1).to(torch.uint8) * packed_row).reshape(-1)

    def zero(self, tensor: torch.Tensor) -> None:
        """Set ``tensor`` (of ``shape``) to zero where the mask is False, in place."""
        if tensor.device.type == "meta":
            return
        if self.split is None or not tensor.is_contiguous():
            zero_pruned(tensor, self.dense())
            return
        rows, pattern = self._rows_and_pattern()
        grid = tensor.view(math.prod(self.shape[: self.split]), -1)
        # Products by uint8 vectors (no type promotion), one per side: a broadcast product streams
        # through memory where index_fill_ over the removed rows jumps, and is the faster of the two.
        if pattern is not None:
            grid.mul_(pattern.to(torch.uint8))
        if rows is not None:
            grid.mul_(rows.to(torch.uint8).reshape(-1, 1))


def kept_along(packed: torch.Tensor, shape: torch.Size | tuple[int, ...], dim: int) -> torch.Tensor:
    """Bool per index of ``dim``: whether the :func:`pack_mask` mask of ``shape`` keeps any entry there.

    Along dimension 0 of a mask whose rows hold a whole number of bytes this reads the packed bytes
    (one per eight entries); otherwise the mask is unpacked.
    """
    size = int(shape[dim])
    if dim == 0 and size and (math.prod(shape) // size) % 8 == 0:
        return packed.reshape(size, -1).any(dim=1).bool()  # any() of uint8 stays uint8
    keep = unpack_mask(packed, shape)
    return keep.movedim(dim, 0).reshape(size, -1).any(dim=1)


def pack_magnitude_above(
    tensor: torch.Tensor,
    threshold: float,
    spare: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
    flags: torch.Tensor | None = None,
    words: torch.Tensor | None = None,
) -> torch.Tensor:
    """``pack_mask`` of "|x| > threshold, or x at a flat position in ``spare``", for ``threshold ≥ 0``,
    in fewer passes than comparing: ``hardshrink`` keeps exactly the entries with |x| > threshold and
    zeroes the others (so those are the non-zero ones), and converting floats to bool is cheaper than
    comparing.

    ``scratch`` (float), ``flags`` (bool) and ``words`` (int64, see :func:`pack_mask`), at least as
    long as needed and on the tensor's device, are used instead of new memory.
    """
    flat = _flat_float32(tensor, threshold)
    n = flat.numel()
    if _fits(scratch, flat) and _fits(flags, flat):
        keep = flags[:n].copy_(torch.hardshrink(flat, threshold, out=scratch[:n]))
    else:
        keep = torch.hardshrink(flat, threshold).bool()
    if spare is not None:
        keep[spare] = True
    return pack_mask(keep, words)


def prune_magnitude(
    tensor: torch.Tensor,
    threshold: float,
    spare: torch.Tensor | None = None,
    flags: torch.Tensor | None = None,
    words: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero, in place, the entries of a contiguous float32 ``tensor`` with |x| ≤ ``threshold`` (≥ 0),
    except those at the flat positions ``spare``; return the bit-packed keep-mask (as
    :func:`pack_magnitude_above` gives it) and the flat bool keep-mask (in ``flags`` when given).

    One fused in-place pass zeroes the weights, and the mask is read off the result: the kept entries
    are the non-zero ones, plus ``spare``. No mask is unpacked and no comparison is made.
    """
    flat = _flat_float32(tensor, threshold)
    if not flat.is_contiguous() or flat.data_ptr() != tensor.data_ptr():
        raise ValueError("prune_magnitude needs a contiguous tensor")
    saved = None if spare is None else flat[spare]
    torch.hardshrink(flat, threshold, out=flat)
    if spare is not None:
        flat[spare] = saved
    keep = flags[: flat.numel()].copy_(flat) if _fits(flags, flat) else flat.bool()
    if spare is not None:
        keep[spare] = True  # a spared weight may be exactly zero
    return pack_mask(keep, words), keep


def _flat_float32(tensor: torch.Tensor, threshold: float) -> torch.Tensor:
    if threshold < 0 or tensor.dtype != torch.float32:
        raise ValueError(f"needs a float32 tensor and a threshold ≥ 0, got {tensor.dtype} and {threshold}")
    return tensor.reshape(-1)


def _fits(buffer: torch.Tensor | None, flat: torch.Tensor) -> bool:
    return buffer is not None and buffer.device == flat.device and buffer.numel() >= flat.numel()


def zero_pruned(tensor: torch.Tensor, keep: torch.Tensor) -> None:
    """Set ``tensor`` to zero where ``keep`` is False, in place.

    Multiplies by the mask's bytes read as ``uint8`` (0 or 1; a view, no copy): one streaming pass,
    several times faster on CPU than ``torch.where(keep, tensor, 0, out=tensor)`` or ``masked_fill_``,
    and faster than a product with the bool mask itself, whose type promotion costs more. A NaN or inf
    at a pruned entry would stay NaN under a product; that only happens once training has diverged,
    and pruning itself refuses non-finite weights.
    """
    tensor.mul_(keep.view(torch.uint8))


_POPCOUNT = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.int64)


def count_kept(packed: torch.Tensor) -> int:
    """How many entries a :func:`pack_mask` mask keeps, read off the packed bytes (padding bits are 0)."""
    flat = packed.detach().reshape(-1)
    if flat.device.type == "cpu" and hasattr(np, "bitwise_count"):  # numpy >= 2.0
        # numpy's popcount, eight bytes at a time: far cheaper than a byte histogram.
        data = flat.contiguous().numpy()
        whole = data.size - data.size % 8
        return int(np.bitwise_count(data[:whole].view(np.uint64)).sum()) + int(np.bitwise_count(data[whole:]).sum())
    counts = torch.bincount(flat.int(), minlength=256)
    return int(counts.dot(_POPCOUNT.to(counts.device)))


def mask_buffer_name(param_name: str) -> str:
    return MASK_PREFIX + param_name


def get_mask(module: nn.Module, param_name: str) -> torch.Tensor | None:
    """Return the boolean keep-mask of ``module.<param_name>``, or ``None`` if it has none."""
    packed = module._buffers.get(mask_buffer_name(param_name))
    if packed is None:
        return None
    return unpack_mask(packed, local_tensor(getattr(module, param_name)).shape)


def set_mask(module: nn.Module, param_name: str, keep: torch.Tensor, packed: torch.Tensor | None = None) -> None:
    """Store ``keep`` (bool, the parameter's shape; its local shard's shape if it is sharded) on the
    module and zero the pruned weights in place.

    Pass ``packed`` (``pack_mask(keep)``) when it is already at hand.
    """
    param = local_tensor(getattr(module, param_name))
    if keep.shape != param.shape:
        raise ValueError(f"mask shape {tuple(keep.shape)} does not match {param_name} shape {tuple(param.shape)}")
    store_packed(module, param_name, pack_mask(keep) if packed is None else packed)
    with torch.no_grad():
        zero_pruned(param, keep)


def store_packed(module: nn.Module, param_name: str, packed: torch.Tensor) -> None:
    """Store a :func:`pack_mask` mask on the module as it is; the caller zeroes the pruned weights."""
    module.register_buffer(mask_buffer_name(param_name), packed, persistent=False)


def remove_mask(module: nn.Module, param_name: str) -> None:
    """Forget the mask of ``module.<param_name>``; the weights keep their zeros."""
    module._buffers.pop(mask_buffer_name(param_name), None)


def masked_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """All masks stored on ``model``, as ``{"<module>.<param>": bool mask}``."""
    found = {}
    for module_name, module in model.named_modules():
        for buffer_name in list(module._buffers):
            if buffer_name.startswith(MASK_PREFIX):
                param_name = buffer_name[len(MASK_PREFIX) :]
                full = f"{module_name}.{param_name}" if module_name else param_name
                found[full] = get_mask(module, param_name)
    return found
