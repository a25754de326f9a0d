"""Counting what is pruned in units, as the granularity (or the dependency groups) defines them, beside
:attr:`prunekit.Pruner.sparsity`, which counts weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core import masks as mask_store
from ..core.distributed import sum_across_ranks
from ..core.sharding import gather_rows, is_sharded
from ..core.targets import Target
from ..methods.granularity import Granularity
from ..structure.dependencies import ChannelDependencies
from ..structure.units import removed_units


def unit_sparsity(
    targets: Sequence[Target], granularity: Granularity, dependencies: ChannelDependencies | None = None
) -> float:
    """Fraction of the targeted units that are pruned: weights for ``"weight"`` and N:M, kernels,
    output or input channels, blocks for ``pk.Block``; with coupled structured pruning, the dependency
    groups' units (a channel counts once however many layers it spans). A unit counts as pruned when
    every one of its weights is masked. On an FSDP2 model the masks are gathered whole, layer by layer
    (a collective: every rank calls this)."""
    if dependencies is not None:
        return float(removed_units(dependencies).float().mean()) if dependencies.num_units else 0.0
    total = pruned = 0
    for target in targets:
        oik = target.oik_shape
        count = granularity.num_units(oik)
        total += count
        keep = mask_store.get_mask(target.module, target.param_name)
        if keep is not None:
            keep = gather_rows(keep, target.param)  # FSDP2: a unit's weights may lie on several ranks
            kept = granularity.unit_scores(target.to_oik(keep.float()), "sum") > 0
            pruned += count - int(kept.sum())
    return pruned / total if total else 0.0


def weight_sparsity(targets: Sequence[Target]) -> float:
    """Fraction of the targets' weights that are masked (biases not counted). On an FSDP2 model each
    rank counts its shards and the counts are summed over the ranks (an all-reduce of two numbers:
    every rank calls this)."""
    total = pruned = 0
    shards = torch.zeros(2, dtype=torch.int64)  # (weights, pruned) of this rank's shards
    for target in targets:
        keep = mask_store.get_mask(target.module, target.param_name)
        lost = keep.numel() - int(keep.sum()) if keep is not None else 0
        if is_sharded(target.param):
            shards += torch.tensor([target.param.to_local().numel(), lost])
        else:
            total, pruned = total + target.param.numel(), pruned + lost
    if any(is_sharded(t.param) for t in targets):
        sum_across_ranks([shards])
    return (pruned + int(shards[1])) / (total + int(shards[0]))
