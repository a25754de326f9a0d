"""Agreeing across the processes of a distributed run, so every rank computes the same masks.

Under ``torch.distributed`` (DistributedDataParallel: one process per device, each on its own
batches) the weights are the same on every rank, but data-dependent scores are not: each rank sees
its own gradients and activations. The criteria and the calibration pass therefore sum what they
collected over all ranks before scoring (:func:`sum_across_ranks`), and random criteria take rank 0's
seed (:func:`rank_zero_int`). Selection itself is deterministic, so equal scores give equal masks,
local or global. Outside a distributed run (or with one process) every function here does nothing.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is supported: parameters are ``DTensor`` shards split
along dim 0 (:mod:`prunekit.core.sharding`). Global selection across shards works by gathering: for
the length of one pruning event every rank all-gathers the pruned weights (and their masks) whole and
runs the unsharded selection on them (:mod:`prunekit.engines.sharding`), so every rank finds the same
exact cut, ties broken as without sharding (layer order, then position), and then keeps the rows of
the masks it holds; enforcement multiplies local shards. The memory this needs is the pruned weights
unsharded, once more, during the event. Gradient criteria read FSDP's reduced gradient of each shard
(the mean over the ranks) times the world size, so no further sum is needed; calibration statistics
are per input channel, whole on every rank, and summed as under DDP. Coupled structured pruning
(tracing) and calibrated one-shot methods (Wanda, SparseGPT, OWL) are refused on sharded models:
prune before sharding. FSDP1 (``FullyShardedDataParallel``, flat parameters) is refused. Tested with
gloo on CPU; the NCCL path (CUDA tensors for the collectives) is untested here (no GPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group of more than one process."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _communication_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo and the others take CPU tensors.
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across_ranks(tensors: Sequence[torch.Tensor]) -> None:
    """Replace every tensor by its sum over all ranks, in place (one flattened all-reduce per dtype).

    Every rank must pass tensors of the same shapes and dtypes in the same order.
    """
    if not is_distributed() or not tensors:
        return
    device = _communication_device()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        with torch.no_grad():
            for tensor in group:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()


def max_across_ranks(value: int) -> int:
    """The largest of ``value`` over all ranks (``value`` itself outside a distributed run)."""
    if not is_distributed():
        return value
    found = torch.tensor([value], dtype=torch.int64, device=_communication_device())
    torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
    return int(found.item())


def rank_zero_int(value: int) -> int:
    """Rank 0's ``value`` on every rank (a seed drawn on each rank becomes one shared seed)."""
    if not is_distributed():
        return value
    found = torch.tensor([value], dtype=torch.int64, device=_communication_device())
    torch.distributed.broadcast(found, src=0)
    return int(found.item())


def unwrap_data_parallel(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (which keep it as ``.module``);
    any other model as it is. Pruning the inner module gives names without the ``module.`` prefix, so
    a pruner's state and masks are the same with and without the wrapper."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model
