"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): reading them whole, and the
rows of a whole tensor that one rank holds.

FSDP2 turns every parameter of a sharded module into a ``DTensor`` split along dim 0 over a 1-D device
mesh (placement ``Shard(0)``): with W ranks and n rows, rank r holds rows ``[r·c, min(n, (r+1)·c))``,
c = ⌈n / W⌉ (``torch.chunk``'s split; the last ranks may hold fewer rows, or none). prunekit keeps
each rank's masks for its own rows, so enforcement multiplies local tensors, and reads a layer whole
(:func:`full_tensor`, one all-gather) only while it chooses masks (see
:mod:`prunekit.engines.sharding`). FSDP1 (``FullyShardedDataParallel``) flattens a module's
parameters into one, which has no (O, I, K) view: it is refused (:func:`check_shardable`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without distributed support has no sharded tensors
    DTensor = Shard = None  # type: ignore[assignment,misc]


def is_sharded(tensor: object) -> bool:
    """True for a ``DTensor`` (a parameter, gradient or optimizer state of an FSDP2 model)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a view: writing to it writes the parameter); any other
    tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather, so every rank must call it at the same point);
    a tensor that is not sharded as it is."""
    return tensor.detach().full_tensor() if is_sharded(tensor) else tensor


def row_range(like: torch.Tensor) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the whole tensor that this rank holds of the sharded ``like``."""
    rows = like.shape[0]
    size = like.device_mesh.size()
    chunk = math.ceil(rows / size) if rows else 0
    start = min(rows, like.device_mesh.get_local_rank() * chunk)
    stop = min(rows, start + chunk)
    if like.to_local().shape[0] != stop - start:
        raise RuntimeError(
            f"a sharded tensor of {rows} rows holds rows {start}..{stop} on this rank, which is not the even "
            "Shard(0) split FSDP2 makes; prunekit supports fully_shard's default sharding only"
        )
    return start, stop


def local_rows(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rows of ``whole`` (a tensor of ``like``'s full shape) that this rank holds of ``like``;
    ``whole`` itself when ``like`` is not sharded."""
    if not is_sharded(like):
        return whole
    start, stop = row_range(like)
    return whole[start:stop]


def gather_rows(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of ``like``'s shape from every rank's rows (``local`` here, sharded as ``like``);
    bool tensors travel as uint8 (gloo has no bool all-gather). ``local`` itself if ``like`` is not sharded."""
    if not is_sharded(like):
        return local
    wire = local.view(torch.uint8) if local.dtype == torch.bool else local
    shape = like.shape
    stride = torch.empty(shape, device="meta").stride()
    whole = DTensor.from_local(wire, like.device_mesh, like.placements, shape=shape, stride=stride).full_tensor()
    return whole.view(torch.bool) if local.dtype == torch.bool else whole


def like_param(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` (of ``param``'s full shape, on every rank) sharded as ``param`` is, or as it is when
    ``param`` is not sharded or ``tensor`` already is; no communication."""
    if not is_sharded(param) or is_sharded(tensor):
        return tensor
    rows = local_rows(tensor, param).contiguous().to(param.to_local().device)
    return DTensor.from_local(rows, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def has_sharded_parameters(model: nn.Module) -> bool:
    """True when some parameter of ``model`` is sharded (FSDP2)."""
    return any(is_sharded(p) for p in model.parameters())


def check_shardable(model: nn.Module) -> bool:
    """Refuse sharding prunekit cannot read; True when the model is sharded by FSDP2 the way it can.

    Raises ``ValueError`` for FSDP1 (``FullyShardedDataParallel``: flat parameters have no (O, I, K)
    view) and for DTensor parameters not split along dim 0 over a 1-D mesh (HSDP's 2-D mesh, tensor
    parallelism), before anything changes.
    """
    if not isinstance(model, nn.Module):
        return False  # the caller says what a model must be
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        FullyShardedDataParallel = None  # noqa: N806
    if FullyShardedDataParallel is not None and any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "FullyShardedDataParallel (FSDP1) keeps each wrapped module's weights in one flattened parameter, "
            "which has no (out, in, kernel) view to prune: prune the model before wrapping it, or shard it "
            "with FSDP2's torch.distributed.fsdp.fully_shard, which prunekit supports"
        )
    sharded = False
    for name, param in model.named_parameters():
        if not is_sharded(param):
            continue
        if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
            raise ValueError(
                f"parameter {name!r} is a DTensor placed {tuple(param.placements)} on a "
                f"{param.device_mesh.ndim}-D mesh; prunekit prunes FSDP2 models sharded along dim 0 over a 1-D "
                "mesh (fully_shard's default) only: prune before sharding otherwise"
            )
        sharded = True
    return sharded
