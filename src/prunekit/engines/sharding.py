"""Choosing masks on a model sharded by FSDP2: each pruning event sees the pruned weights whole.

For the length of one pruning event (:func:`whole_weights`) every maskable parameter that is sharded
(a ``DTensor``, ``Shard(0)``) is all-gathered and put on its module in place of the shard, and so is
its mask (each rank stores the mask of its own rows). The criteria, the engines (local, global and
row scope, N:M, every granularity) and the constraints then run unchanged on the whole tensors,
identical on every rank, so every rank computes the same masks as one process pruning the unsharded
model: global selection (:func:`prunekit.engines.selection.find_cut`, exact, ties broken by layer order
then position) ranks all layers' units exactly as it does without sharding. On the way out each rank
keeps the rows of the new masks it holds, zeroes its shard with them and puts the shards back.

Memory: during the event each rank holds the unsharded pruned weights (and their biases) and their
masks, besides its shards: the model's pruned weights once more in full, freed when the event ends.
Prune before sharding where that does not fit. Nothing that runs the model (calibration, ``data=``
batches) may run inside the event; the pruner runs them before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..core import masks as mask_store
from ..core.sharding import full_tensor, gather_rows, is_sharded, local_rows, local_tensor
from .update import MaskKey


@contextmanager
def whole_weights(maskable: Sequence[MaskKey], forget: Callable[[], None]) -> Iterator[None]:
    """Swap each sharded maskable parameter (and its mask) for the whole tensor while the body runs,
    then keep this rank's rows of the masks the body stored, zero the shards with them and put the
    shards back. On an exception the shards and their old masks are put back unchanged.

    ``forget()`` drops the caller's cached masks (they are local before and whole inside)."""
    swapped: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor | None]] = []
    seen: set[int] = set()
    forget()
    try:
        with torch.no_grad():
            for module, param_name, _ in maskable:
                param = module._parameters.get(param_name)
                if not is_sharded(param) or id(param) in seen:
                    continue
                seen.add(id(param))
                buffer_name = mask_store.mask_buffer_name(param_name)
                old = module._buffers.get(buffer_name)
                whole = nn.Parameter(full_tensor(param), requires_grad=param.requires_grad)
                swapped.append((module, param_name, param, old))
                module._parameters[param_name] = whole
                if old is not None:
                    keep = gather_rows(mask_store.unpack_mask(old, local_tensor(param).shape), param)
                    mask_store.store_packed(module, param_name, mask_store.pack_mask(keep))
        yield
    except BaseException:
        for module, param_name, shard, old in swapped:
            module._parameters[param_name] = shard
            if old is not None:
                mask_store.store_packed(module, param_name, old)
            else:
                mask_store.remove_mask(module, param_name)
        forget()
        raise
    with torch.no_grad():
        for module, param_name, shard, _ in swapped:
            keep = mask_store.get_mask(module, param_name)
            module._parameters[param_name] = shard
            if keep is not None:
                mask_store.set_mask(module, param_name, local_rows(keep, shard).contiguous())
    forget()
