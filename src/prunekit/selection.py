"""Selection: given unit scores, decide exactly which units to prune.

:func:`prune_lowest` prunes the ``k`` lowest-scoring units across a list of layers (one layer for
local scope, all of them for global scope). The answer is exact and deterministic: exactly ``k``
units are pruned, and among equal scores the unit that comes first (layer order, then position in
the layer) is pruned first.

Scores are never concatenated into one big vector when there are many of them. ``torch.kthvalue``
or ``torch.quantile`` on a concatenation needs several copies of every score at once (and
``torch.nn.utils.prune.global_unstructured`` does exactly that); here the threshold is found in
passes over one layer at a time:

1. a random sample of 2^20 scores brackets the k-th smallest value between two sample order
   statistics ``lo`` ≤ v* ≤ ``hi`` (a ±6σ band of the sample rank, σ = √(n·q·(1−q)));
2. one pass counts the scores below ``lo``, equal to ``lo`` and up to ``hi``, and keeps only the
   few scores strictly between them, from which v* is read exactly;
3. one pass builds the masks: scores above v* are kept, scores below are pruned, and the ties at v*
   are pruned in order until the count is exact.

If the sample misleads (very unlikely), the bracket is narrowed by bisection over the float32
bit patterns with counting passes, so memory stays bounded either way. Scores are float32;
already pruned units score −inf and units that must be kept score +inf.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence

import torch

ScoreFn = Callable[[], torch.Tensor]

#: Below this many units in all, scores are concatenated and sorted (fast, exact, same result).
SORT_LIMIT = 1 << 22
SAMPLE_SIZE = 1 << 20
#: Most candidate scores held at once when the sample bracket is used (4 bytes each).
CANDIDATE_LIMIT = 1 << 24


def prune_lowest(score_fns: Sequence[ScoreFn], sizes: Sequence[int], k: int) -> list[torch.Tensor]:
    """Return one flat ``bool`` keep-mask per layer, pruning the ``k`` lowest scores overall.

    ``score_fns[i]()`` returns layer i's flat float scores (``sizes[i]`` of them); it may be called
    more than once, so it should be cheap to recompute rather than cached.
    """
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"cannot prune {k} of {total} units")
    if k == 0:
        return [torch.ones(n, dtype=torch.bool) for n in sizes]
    if total <= SORT_LIMIT:
        return _prune_by_sort(score_fns, sizes, k)
    threshold, below = _kth_smallest(score_fns, sizes, k)
    return _masks_at_threshold(score_fns, threshold, k - below)


def _prune_by_sort(score_fns, sizes, k):
    scores = torch.cat([fn().reshape(-1).float().cpu() for fn in score_fns])
    order = torch.argsort(scores, stable=True)
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    return list(keep.split(list(sizes)))


def _masks_at_threshold(score_fns, threshold: float, ties_to_prune: int) -> list[torch.Tensor]:
    masks = []
    for fn in score_fns:
        scores = fn().reshape(-1)
        if ties_to_prune == 0:
            masks.append(scores >= threshold)
            continue
        keep = scores > threshold
        ties = scores == threshold
        n_ties = int(ties.sum())
        if n_ties > ties_to_prune:
            spared = ties.nonzero().squeeze(1)[ties_to_prune:]
            keep[spared] = True
            n_ties = ties_to_prune
        ties_to_prune -= n_ties
        masks.append(keep)
    return masks


def _kth_smallest(score_fns, sizes, k: int) -> tuple[float, int]:
    """The k-th smallest score v* (1-based) and how many scores are strictly below it."""
    lo, hi = _sample_bracket(score_fns, sizes, k)
    while True:
        below_lo, at_lo, below_hi, at_hi, inside = _bracket_pass(score_fns, lo, hi)
        if k <= below_lo:
            lo, hi = -math.inf, lo
        elif k <= below_lo + at_lo:
            return lo, below_lo
        elif k > below_hi + at_hi:
            lo, hi = hi, math.inf
        elif k > below_hi:
            return hi, below_hi
        elif inside is not None:
            value = float(torch.kthvalue(inside, k - below_lo - at_lo).values)
            return value, below_lo + at_lo + int((inside < value).sum())
        lo, hi = _narrow(score_fns, k, lo, hi)


def _sample_bracket(score_fns, sizes, k):
    total = sum(sizes)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for fn, n in zip(score_fns, sizes):
        m = max(1, round(SAMPLE_SIZE * n / total))
        positions = torch.randint(n, (m,), generator=generator)
        scores = fn().reshape(-1)
        samples.append(scores[positions.to(scores.device)].float().cpu())
    sample = torch.sort(torch.cat(samples)).values
    n_sample = sample.numel()
    q = k / total
    rank = q * n_sample
    margin = 6.0 * math.sqrt(n_sample * q * (1.0 - q)) + 8.0
    lo_rank, hi_rank = math.floor(rank - margin), math.ceil(rank + margin)
    lo = float(sample[lo_rank]) if lo_rank >= 0 else -math.inf
    hi = float(sample[hi_rank]) if hi_rank < n_sample else math.inf
    return lo, hi


def _bracket_pass(score_fns, lo: float, hi: float):
    """Counts below/at ``lo`` and ``hi``, and the scores strictly between them (None if too many)."""
    below_lo = at_lo = below_hi = at_hi = 0
    inside: list[torch.Tensor] | None = []
    n_inside = 0
    for fn in score_fns:
        scores = fn().reshape(-1)
        below_lo += int((scores < lo).sum())
        at_lo += int((scores == lo).sum())
        below_hi += int((scores < hi).sum())
        at_hi += int((scores == hi).sum())
        if inside is not None:
            between = scores[(scores > lo) & (scores < hi)]
            n_inside += between.numel()
            inside = None if n_inside > CANDIDATE_LIMIT else inside + [between.float().cpu()]
    return below_lo, at_lo, below_hi, at_hi, (torch.cat(inside) if inside is not None else None)


def _count(score_fns, predicate) -> int:
    return sum(int(predicate(fn().reshape(-1)).sum()) for fn in score_fns)


def _float_key(x: float) -> int:
    """An integer whose order matches the float32 order (−inf lowest, +inf highest)."""
    (bits,) = struct.unpack("<i", struct.pack("<f", x))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF) - 1


def _key_float(key: int) -> float:
    bits = key if key >= 0 else (-key - 1) - 0x80000000
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _narrow(score_fns, k, lo, hi):
    """Bisect [lo, hi] on float32 bit patterns until few scores lie strictly inside it.

    Invariant: v* is in [lo, hi]. Each step costs two counting passes; at most ~32 steps.
    """
    lo_key, hi_key = _float_key(lo), _float_key(hi)
    while hi_key - lo_key > 1 and _count(score_fns, lambda s, lo=lo, hi=hi: (s > lo) & (s < hi)) > CANDIDATE_LIMIT:
        mid = _key_float((lo_key + hi_key) // 2)
        if _count(score_fns, lambda s, mid=mid: s <= mid) >= k:
            hi, hi_key = mid, _float_key(mid)
        else:
            lo, lo_key = mid, _float_key(mid)
    return lo, hi
