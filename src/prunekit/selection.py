"""Selection: given unit scores, decide exactly which units to prune.

:func:`find_cut` finds where to cut so that exactly ``k`` units are pruned across a list of layers
(one layer for local scope, many for global scope): the ``k`` lowest scores go, and among equal
scores the unit that comes first (layer order, then position in the layer) goes first. Every layer
keeps at least ``min_kept`` units (its best ones), so global pruning never empties a layer.

Scores are never concatenated into one big vector when there are many of them: ``torch.kthvalue``
or ``torch.quantile`` on a concatenation needs copies of every score at once (and
``torch.nn.utils.prune.global_unstructured`` does that). Here the cut is found in passes over one
layer at a time, so the extra memory is one layer's scores plus a small sample:

1. a random sample of the scores brackets the k-th smallest value v* between two sample order
   statistics ``lo ≤ v* ≤ hi`` (a band of ±6σ around the sample rank, σ = √(n·q·(1−q)));
2. one pass counts the scores below ``lo`` and keeps the few in ``[lo, hi]``, from which v* and
   the number of ties to prune in each layer are read exactly;
3. the caller builds each layer's mask from :meth:`Cut.keep`, one layer at a time.

If the sample misleads (very unlikely) the bracket is narrowed by bisection over the float32 bit
patterns with counting passes, so memory stays bounded either way. Scores are float32; a unit that
is already pruned should score −inf.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

#: ``fn(out)`` returns one layer's flat float32 scores; it may write them into ``out`` (a scratch
#: buffer at least that long, or None) and the result is only read until the next call.
ScoreFn = Callable[[torch.Tensor | None], torch.Tensor]

#: Up to this many units in all, scores are concatenated (fast; the result is the same).
SORT_LIMIT = 1 << 22
#: Scores sampled to bracket the threshold; None grows it with the number of units (see _sample_size).
SAMPLE_SIZE: int | None = None
#: Candidate scores held at once in pass 2 (4 bytes each).
CANDIDATE_LIMIT = 1 << 24
_LARGEST = struct.unpack("<f", struct.pack("<i", 0x7F7FFFFF))[0]  # the largest finite float32


@dataclass
class Cut:
    """Where to cut: prune scores below ``threshold`` and, in layer i, the first ``ties[i]`` units
    scoring exactly ``threshold``; never prune the units in ``protected[i]``."""

    threshold: float
    ties: list[int]
    protected: list[_Protection | None] = field(default_factory=list)

    def keep(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        """Flat bool keep-mask of ``layer`` given its scores (as its score function returns them)."""
        scores = _protect(scores.reshape(-1), self.protected[layer] if self.protected else None)
        ties = self.ties[layer]
        if ties == 0:
            return scores >= self.threshold
        keep = scores > self.threshold
        at_threshold = scores == self.threshold
        if ties < int(at_threshold.sum()):
            keep[at_threshold.nonzero().squeeze(1)[ties:]] = True
        return keep


@dataclass
class _Protection:
    """A layer's units that must be kept. They are given +inf, so a layer whose own scores reach
    +inf has them lowered to the largest finite float first (``clamp``)."""

    positions: torch.Tensor
    clamp: bool


def _protect(scores: torch.Tensor, protection: _Protection | None) -> torch.Tensor:
    if protection is not None:
        if protection.clamp:
            scores.clamp_(max=_LARGEST)
        scores[protection.positions] = math.inf
    return scores


def _protection(scores: torch.Tensor, count: int) -> _Protection | None:
    """Protect the ``count`` units that would be pruned last: the best scores and, among equal
    scores, the later positions (ties are pruned earlier-first), so protecting a layer that would
    keep them anyway changes nothing."""
    if count == 0 or scores.numel() == 0:
        return None
    clamp = bool(scores.max() == math.inf)
    if clamp:
        scores.clamp_(max=_LARGEST)
    if count >= scores.numel():
        return _Protection(torch.arange(scores.numel(), device=scores.device), clamp)
    last = scores.max() if count == 1 else torch.topk(scores, count).values[-1]
    above = (scores > last).nonzero().squeeze(1)
    ties = (scores == last).nonzero().squeeze(1)
    return _Protection(torch.cat([above, ties[ties.numel() - (count - above.numel()) :]]), clamp)


def find_cut(score_fns: Sequence[ScoreFn], sizes: Sequence[int], k: int, min_kept: int = 0) -> Cut:
    """Find the :class:`Cut` pruning ``k`` units (fewer if ``min_kept`` forbids) of these layers.

    ``score_fns`` must return tensors the caller owns (not views of weights): protection writes +inf
    into them.
    """
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"cannot prune {k} of {total} units")
    k = min(k, total - sum(min(min_kept, n) for n in sizes))
    scratch = torch.empty(max(sizes, default=0), dtype=torch.float32) if total > SORT_LIMIT else None

    # Pass 1: protect every layer's best units, and sample (or, when small, collect) the scores.
    protected: list[_Protection | None] = []
    collected: list[torch.Tensor] = []
    generator = torch.Generator().manual_seed(0)
    sample_size = _sample_size(total)
    for fn, n in zip(score_fns, sizes):
        scores = fn(scratch).reshape(-1)
        if scratch is None:
            scores = scores.float().cpu().clone()
        protected.append(_protection(scores, min_kept))
        scores = _protect(scores, protected[-1])
        if scratch is None:
            collected.append(scores)
        elif n:
            positions = torch.randint(n, (max(1, round(sample_size * n / total)),), generator=generator)
            collected.append(scores[positions.to(scores.device)].float().cpu())
    if k == 0:
        return Cut(-math.inf, [0] * len(sizes), protected)
    if scratch is None:
        everything = torch.cat(collected) if collected else torch.empty(0)
        threshold = float(torch.kthvalue(everything, k).values)
        below = int((everything < threshold).sum())
        return Cut(threshold, _spread_ties(collected, threshold, k - below), protected)

    fns = [lambda out, fn=fn, p=p: _protect(fn(out).reshape(-1), p) for fn, p in zip(score_fns, protected)]
    lo, hi = _sample_bracket(torch.cat(collected), k / total)
    # Pass 2, repeated only if the sample misled: count below the bracket, collect inside it.
    while True:
        below_lo, inside = _bracket_pass(fns, scratch, lo, hi)
        if inside is not None:
            values = torch.cat(inside)
            if below_lo < k <= below_lo + values.numel():
                threshold = float(torch.kthvalue(values, k - below_lo).values)
                below = below_lo + int((values < threshold).sum())
                return Cut(threshold, _spread_ties(inside, threshold, k - below), protected)
            lo, hi = (-math.inf, lo) if k <= below_lo else (hi, math.inf)
        elif _float_key(hi) - _float_key(lo) <= 1:
            return _cut_between_neighbours(fns, scratch, k, lo, hi, protected)
        lo, hi = _narrow(fns, scratch, k, lo, hi)


def _cut_between_neighbours(fns, scratch, k, lo, hi, protected) -> Cut:
    """v* is ``lo`` or ``hi``, adjacent float32 values shared by too many units to collect."""
    below = _count(fns, scratch, lambda s: s < lo)
    at_lo = [int(torch.count_nonzero(fn(scratch) == lo)) for fn in fns]
    if k <= below + sum(at_lo):
        threshold, ties_per_layer = lo, at_lo
    else:
        below += sum(at_lo)
        threshold, ties_per_layer = hi, [int(torch.count_nonzero(fn(scratch) == hi)) for fn in fns]
    to_prune, ties = k - below, []
    for available in ties_per_layer:
        ties.append(min(available, to_prune))
        to_prune -= ties[-1]
    return Cut(threshold, ties, protected)


def prune_lowest(score_fns: Sequence[Callable[[], torch.Tensor]], sizes: Sequence[int], k: int, min_kept: int = 0):
    """Flat bool keep-masks, one per layer, pruning the ``k`` lowest scores overall (see :func:`find_cut`).

    ``score_fns[i]()`` returns layer i's scores; convenient when the scores are at hand.
    """
    fns = [lambda out, fn=fn: fn().reshape(-1).float().clone() for fn in score_fns]
    cut = find_cut(fns, sizes, k, min_kept)
    return [cut.keep(i, fn(None)) for i, fn in enumerate(fns)]


def _spread_ties(per_layer: list[torch.Tensor], threshold: float, to_prune: int) -> list[int]:
    """How many units at exactly ``threshold`` each layer prunes, filling layers in order."""
    ties = []
    for values in per_layer:
        here = min(int((values == threshold).sum()), to_prune)
        ties.append(here)
        to_prune -= here
    return ties


def _sample_size(total: int) -> int:
    if SAMPLE_SIZE is not None:
        return min(SAMPLE_SIZE, total)
    # The bracket holds about total·12σ/n scores; growing n with total keeps that near 2^22.
    wanted = (total * 6 / (1 << 22)) ** 2
    return int(min(max(wanted, 1 << 14), 1 << 22, total))


def _sample_bracket(sample: torch.Tensor, q: float) -> tuple[float, float]:
    n = sample.numel()
    rank = q * n
    margin = 6.0 * math.sqrt(n * q * (1.0 - q)) + 8.0
    lo_rank, hi_rank = math.floor(rank - margin), math.ceil(rank + margin)
    lo = float(torch.kthvalue(sample, lo_rank + 1).values) if lo_rank >= 0 else -math.inf
    hi = float(torch.kthvalue(sample, hi_rank + 1).values) if hi_rank < n else math.inf
    # Pruned units (−inf) and protected ones (+inf) can be many: keep them out of the bracket's inside.
    return max(lo, -_LARGEST), min(hi, _LARGEST)


def _bracket_pass(fns, scratch, lo: float, hi: float):
    """Scores below ``lo`` (a count) and those in ``[lo, hi]`` (per layer; None if too many)."""
    below_lo, inside, n_inside = 0, [], 0
    flags = torch.empty(scratch.numel(), dtype=torch.bool)
    more = torch.empty(scratch.numel(), dtype=torch.bool)
    for fn in fns:
        scores = fn(scratch)
        n = scores.numel()
        # Writing comparisons into reused buffers avoids page-faulting fresh memory every layer.
        on_cpu = scores.device.type == "cpu"
        at_least_lo = torch.ge(scores, lo, out=flags[:n]) if on_cpu else scores >= lo
        below_lo += n - int(torch.count_nonzero(at_least_lo))
        if inside is None:
            continue
        in_bracket = (torch.le(scores, hi, out=more[:n]) if on_cpu else scores <= hi).logical_and_(at_least_lo)
        values = scores[in_bracket]
        n_inside += values.numel()
        inside = None if n_inside > CANDIDATE_LIMIT else inside + [values.cpu()]
    return below_lo, inside


def _count(fns, scratch, predicate) -> int:
    return sum(int(torch.count_nonzero(predicate(fn(scratch)))) for fn in fns)


def _float_key(x: float) -> int:
    """An integer whose order matches the float32 order (−inf lowest, +inf highest)."""
    (bits,) = struct.unpack("<i", struct.pack("<f", x))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF) - 1


def _key_float(key: int) -> float:
    bits = key if key >= 0 else (-key - 1) - 0x80000000
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _narrow(fns, scratch, k, lo, hi):
    """Bisect [lo, hi] (which holds v*) on float32 bit patterns until few scores lie inside it."""
    lo_key, hi_key = _float_key(lo), _float_key(hi)
    while hi_key - lo_key > 1 and _count(fns, scratch, lambda s, lo=lo, hi=hi: (s >= lo) & (s <= hi)) > CANDIDATE_LIMIT:
        mid = _key_float((lo_key + hi_key) // 2)
        if _count(fns, scratch, lambda s, mid=mid: s <= mid) >= k:
            hi, hi_key = mid, _float_key(mid)
        else:
            lo, lo_key = mid, _float_key(mid)
    return lo, hi
