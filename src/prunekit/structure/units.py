"""Scoring and choosing units of structured pruning (the coupled groups of :mod:`.dependencies`).

A unit's score is the norm of its members' element scores, over every targeted weight slice in it
(the filters that write its channels and the input columns that read them): with the criterion's
``reduce="sum"`` (L1, the default of ``"magnitude"`` and the data criteria) the sum of the element
scores, with ``reduce="l2"`` the square root of the sum of their squares. Normalisation and bias
parameters are masked with the unit but do not score it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from ..core import masks as mask_store
from .dependencies import ChannelDependencies


def unit_scores(
    dependencies: ChannelDependencies,
    element_scores: Mapping[str, Callable[[], torch.Tensor]],
    reduce: str,
    nonzero_units: torch.Tensor | None = None,
) -> torch.Tensor:
    """One float64 score per unit; ``element_scores[tensor full name]()`` gives a weight's element scores.

    ``nonzero_units`` (bool, one entry per unit, all False), when given and the element scores are the
    weights' magnitudes (or the weights, under ``reduce="l2"``), is set True for every unit some unmasked
    filter of which has a non-zero score, i.e. a non-zero weight: such a unit is certainly not removed
    already (see :func:`removed_units`), read off the scores at no extra cost."""
    spare = dependencies.num_units  # a last slot for the indices in no unit (cheaper than masking them out)
    total = torch.zeros(spare + 1, dtype=torch.float64)
    cache: dict[str, torch.Tensor] = {}
    for piece in dependencies.slices:
        make = element_scores.get(piece.full_name)
        if make is None:
            continue
        if piece.full_name not in cache:
            cache[piece.full_name] = make().detach()
        scores = cache[piece.full_name]
        per_index = _per_index(scores, piece.dim, reduce).cpu()
        units = torch.where(piece.unit >= 0, piece.unit, spare)
        total.index_add_(0, units, per_index)
        if nonzero_units is not None and not piece.consumer and not _has_mask(piece):
            # a sum of magnitudes (or squares) above 0 has a non-zero term; 0 may hide underflow: not used
            proven = torch.zeros(spare + 1, dtype=torch.bool).index_fill_(0, units[per_index > 0], True)
            nonzero_units |= proven[:spare]
    total = total[:spare]
    return total.sqrt() if reduce == "l2" else total


def _has_mask(piece) -> bool:
    return mask_store.mask_buffer_name(piece.tensor_name) in piece.module._buffers


def _per_index(scores: torch.Tensor, dim: int, reduce: str) -> torch.Tensor:
    """Float64 sum (reduce="sum") or squared L2 norm (reduce="l2", so that members add up to the group's
    squared norm) of the scores of each index of ``dim``."""
    if dim == 0:
        if reduce == "l2":
            return torch.linalg.vector_norm(scores.float(), 2, dim=tuple(range(1, scores.ndim))).double().square()
        return scores.float().sum(dim=tuple(range(1, scores.ndim))).double()
    # Any other dimension (the input channels of a weight): reducing over the leading dimensions in one
    # go strides through memory and is many times slower than summing whole leading slices first.
    size = scores.shape[dim]
    grid = scores.float().reshape(math.prod(scores.shape[:dim]), size, -1)
    if reduce == "l2":
        grid = grid.square()
    return grid.sum(dim=0).sum(dim=1).double()


def choose_units(
    scores: torch.Tensor,
    family: torch.Tensor,
    family_sparsity: torch.Tensor,
    pooled: torch.Tensor,
    already: torch.Tensor,
    min_kept: int,
    round_to: int = 1,
    max_family_sparsity: float = 1.0,
) -> torch.Tensor:
    """Bool per unit: pruned.

    Families with ``pooled[f]`` True are ranked together (global scope) to prune ``family_sparsity``
    of their pooled units; each other family prunes its own fraction ``family_sparsity[f]`` (local).
    Units in ``already`` stay pruned and count towards the targets. Every family keeps at least
    ``min_kept`` units and loses at most ``max_family_sparsity`` of them (and its kept count is
    rounded up to a multiple of ``round_to`` where the family is large enough), so no layer is emptied
    or pruned much harder than the rest under a global ranking. Ties go to the earlier unit.
    """
    num_families = int(family_sparsity.numel())
    sizes = torch.bincount(family, minlength=num_families)
    # How many units each family may lose at most.
    cap = torch.minimum((sizes - min_kept).clamp(min=0), torch.floor(sizes * max_family_sparsity + 1e-9).long())
    scores = scores.masked_fill(already, -math.inf)
    order = torch.argsort(scores, stable=True)
    ranked_family = family[order]
    # Rank of each unit within its family, in ascending score order: a stable sort by family keeps the
    # score order inside each family, so a unit's rank is its position less its family's first position.
    by_family = torch.argsort(ranked_family, stable=True)
    first = torch.cumsum(sizes, 0) - sizes
    within = torch.empty_like(order)
    within[by_family] = torch.arange(order.numel()) - first[ranked_family[by_family]]
    eligible = within < cap[ranked_family]
    # A local family prunes its lowest-ranked units: its share of its size (rounded half to even, as
    # Python's round), at most its cap, and at least the units it has already lost.
    lost = torch.bincount(family[already], minlength=num_families)
    count = torch.maximum(torch.minimum(torch.round(family_sparsity * sizes).long(), cap), lost)
    local = ~pooled[ranked_family] & (within < count[ranked_family]) & eligible
    pruned = torch.zeros_like(already)
    pruned[order[local]] = True
    if bool(pooled.any()):
        in_pool = pooled[ranked_family]
        pool_size = int(sizes[pooled].sum())
        sparsity = float(family_sparsity[pooled][0])
        count = max(round(sparsity * pool_size), int(already[pooled[family]].sum()))
        candidates = torch.nonzero(in_pool & eligible).reshape(-1)[:count]
        pruned[order[candidates]] = True
    pruned |= already
    if round_to > 1:
        pruned = _round_kept(pruned, scores, family, sizes, round_to, already)
    return pruned


def _round_kept(pruned, scores, family, sizes, round_to, already) -> torch.Tensor:
    """Give back the best pruned units of each family until its kept count is a multiple of round_to."""
    pruned = pruned.clone()
    for f in range(int(sizes.numel())):
        members = family == f
        kept = int((members & ~pruned).sum())
        target = min(int(sizes[f]), math.ceil(kept / round_to) * round_to) if kept else 0
        if target <= kept:
            continue
        back = torch.nonzero(members & pruned & ~already).reshape(-1)
        best = back[torch.argsort(scores[back], descending=True, stable=True)][: target - kept]
        pruned[best] = False
    return pruned


def unit_keep_factors(dependencies: ChannelDependencies, pruned: torch.Tensor) -> dict[str, dict[int, torch.Tensor]]:
    """``{parameter full name: {dim: bool keep vector of that dimension}}`` for every parameter a pruned
    unit touches: its keep mask is the AND of these vectors broadcast along their dimensions (see
    :class:`prunekit.core.masks.SeparableMask`)."""
    factors: dict[str, dict[int, torch.Tensor]] = {}
    for piece in dependencies.slices:
        if not piece.maskable:
            continue
        removed = piece.removed(pruned)
        if not bool(removed.any()):
            continue
        keep = (~removed).to(piece.tensor.device)
        found = factors.setdefault(piece.full_name, {})
        found[piece.dim] = keep if piece.dim not in found else found[piece.dim] & keep
    return factors


def removed_units(dependencies: ChannelDependencies, nonzero_units: torch.Tensor | None = None) -> torch.Tensor:
    """Bool per unit: True when the unit's channels are zero: every parameter slice that makes them
    (filters, biases, norm weights) is pruned, i.e. masked, or all zeros where the parameter has no mask.
    Input columns that read the channels and buffers (running statistics) do not count: they go with it
    (except for a unit whose channels are not zero when pruned, ``unit_read_out``: the columns that read
    it must be zero as well).
    The stored bit-packed masks are read as they are (:func:`prunekit.core.masks.kept_along`), mostly
    without unpacking them. ``nonzero_units`` (bool
    per unit, from :func:`unit_scores`) marks units known to have a non-zero filter: the weights of a piece
    whose units are all known so are not read again."""
    # One spare slot at the end takes the indices in no unit (a where instead of boolean-mask indexing).
    spare = dependencies.num_units
    gone = torch.ones(spare + 1, dtype=torch.bool)
    seen = torch.zeros(spare + 1, dtype=torch.bool)
    read_out = torch.cat([dependencies.unit_read_out, torch.zeros(1, dtype=torch.bool)])
    any_read_out = bool(dependencies.unit_read_out.any())
    for piece in dependencies.slices:
        if not piece.maskable or (piece.consumer and not any_read_out):
            continue
        if piece.consumer:
            # A unit whose channels stay non-zero when pruned (a multi-query head) is gone only once the
            # columns reading it are zero too: otherwise removing it would change what they add up.
            units = torch.where(piece.unit >= 0, piece.unit, spare)
            if bool(read_out.index_select(0, units).any()):
                units = torch.where(read_out.index_select(0, units), units, spare)
                gone.scatter_reduce_(0, units, ~_alive(piece), reduce="amin")
            continue
        units = torch.where(piece.unit >= 0, piece.unit, spare)
        if nonzero_units is not None and not _has_mask(piece):
            inside = piece.unit[piece.unit >= 0]
            if bool(nonzero_units.index_select(0, inside).all()):
                seen.index_fill_(0, units, True)  # alive: gone stays True only where nonzero_units rules it out
                continue
        gone.scatter_reduce_(0, units, ~_alive(piece), reduce="amin")
        seen.index_fill_(0, units, True)
    found = (gone & seen)[:spare]
    return found if nonzero_units is None else found & ~nonzero_units


def _alive(piece) -> torch.Tensor:
    """Bool per index of the piece's dimension: not masked, and (without a mask) not all zeros."""
    values = piece.tensor.detach()
    size = values.shape[piece.dim]
    packed = piece.module._buffers.get(mask_store.mask_buffer_name(piece.tensor_name))
    if values.device.type == "meta":
        return torch.ones(size, dtype=torch.bool)
    if packed is not None:
        return mask_store.kept_along(packed, values.shape, piece.dim).cpu()
    # The largest |value| of each index, compared with 0: several times faster than any() over a bool
    # copy (NaN stays alive, as with != 0).
    lead = math.prod(values.shape[: piece.dim])
    return values.reshape(lead, size, -1).abs().amax(dim=(0, 2)).cpu() != 0
