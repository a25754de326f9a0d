"""Counting what is pruned in units, as the granularity (or the dependency groups) defines them, beside
:attr:`prunekit.Pruner.sparsity`, which counts weights."""

from __future__ import annotations

from collections.abc import Sequence

from ..core import masks as mask_store
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
    every one of its weights is masked."""
    if dependencies is not None:
        return float(removed_units(dependencies).float().mean()) if dependencies.num_units else 0.0
    total = pruned = 0
    for target in targets:
        oik = target.oik_shape
        count = granularity.num_units(oik)
        total += count
        keep = mask_store.get_mask(target.module, target.param_name)
        if keep is not None:
            kept = granularity.unit_scores(target.to_oik(keep.float()), "sum") > 0
            pruned += count - int(kept.sum())
    return pruned / total if total else 0.0
