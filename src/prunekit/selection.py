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
3. a layer that would keep fewer than ``min_kept`` units gets its best units taken out of the
   competition (they are kept), and v* is read again from the same counts;
4. the caller builds each layer's mask from :meth:`Cut.keep`, one layer at a time.

If the sample misleads (very unlikely) the bracket is narrowed by bisection over the float32 bit
patterns with counting passes, so memory stays bounded either way. Scores are float32; a unit that
is already pruned should score −inf.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .masks import pack_mask, set_bits

#: ``fn(out)`` returns one layer's flat float32 scores; it may write them into ``out`` (a scratch
#: buffer at least that long, or None) and the result is only read until the next call. It may also
#: offer ``fn.at(positions)``, the scores at those flat positions alone, which makes sampling cheap.
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
    """Where to cut: in layer i, keep the ``protected[i]`` units, prune the other units scoring below
    ``threshold`` and the first ``ties[i]`` of those scoring exactly ``threshold``; keep the rest."""

    threshold: float
    ties: list[int]
    protected: list[torch.Tensor | None]
    ranking: _Ranking | None = None

    def packed_keep(self, layer: int) -> torch.Tensor | None:
        """The layer's keep-mask already bit-packed (see :func:`prunekit.masks.pack_mask`), built from
        what the counting pass recorded without scoring again; None when that pass did not record it.
        Each layer's mask can be taken once."""
        ranking = self.ranking
        if ranking is None or ranking.tentative is None or ranking.tentative[layer] is None:
            return None
        # Handed over, not copied: a layer's mask is asked for once, and copies would double the memory.
        packed, ranking.tentative[layer] = ranking.tentative[layer], None
        positions, values = ranking.positions[layer], ranking.inside[layer]
        pruned = values < self.threshold
        pruned[(values == self.threshold).nonzero().squeeze(1)[: self.ties[layer]]] = True
        set_bits(packed, positions[pruned], False)
        if self.protected[layer] is not None:
            set_bits(packed, self.protected[layer].cpu(), True)
        return packed

    def keep(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        """Flat bool keep-mask of ``layer`` given its scores (as its score function returns them)."""
        scores = scores.reshape(-1)
        protected, ties = self.protected[layer], self.ties[layer]
        if ties == 0:
            keep = scores >= self.threshold
        else:
            keep = scores > self.threshold
            at_threshold = scores == self.threshold
            if protected is not None:
                at_threshold[protected] = False
            if ties < int(at_threshold.sum()):
                keep[at_threshold.nonzero().squeeze(1)[ties:]] = True
        if protected is not None:
            keep[protected] = True
        return keep


def _protection(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` units that would be pruned last: the best scores and, among equal
    scores, the later positions (ties are pruned earlier-first), so protecting a layer that keeps
    them anyway changes nothing."""
    if count >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    last = scores.max() if count == 1 else torch.topk(scores, count).values[-1]
    above = (scores > last).nonzero().squeeze(1)
    ties = (scores == last).nonzero().squeeze(1)
    return torch.cat([above, ties[ties.numel() - (count - above.numel()) :]])


def _count(flags: torch.Tensor, protected: torch.Tensor | None) -> int:
    """How many flags are set outside the protected positions (which take no part in the ranking)."""
    if protected is not None:
        flags[protected] = False
    return int(torch.count_nonzero(flags))


class _Ranking:
    """What is known about the competing scores: per layer, how many lie below ``lo`` and the values
    in ``[lo, hi]`` (protected units excluded)."""

    def __init__(self, lo, hi, below: list[int], inside: list[torch.Tensor], positions=None, tentative=None):
        self.lo, self.hi, self.below, self.inside = lo, hi, below, inside
        # Optional, from a counting pass: where the inside values sit, and the packed mask "score ≥ lo".
        self.positions, self.tentative = positions, tentative

    def cut(self, k: int, protected: list[torch.Tensor | None]) -> Cut | None:
        """The cut if v* lies in ``[lo, hi]``; None if it lies outside."""
        below = sum(self.below)
        values = torch.cat(self.inside) if self.inside else torch.empty(0)
        if not below < k <= below + values.numel():
            return None
        threshold = float(torch.kthvalue(values, k - below).values)
        to_prune = k - below - int((values < threshold).sum())
        ties = []
        for layer_values in self.inside:
            ties.append(min(int((layer_values == threshold).sum()), to_prune))
            to_prune -= ties[-1]
        return Cut(threshold, ties, protected, self)

    def kept(self, layer: int, size: int, cut: Cut) -> int:
        values = self.inside[layer]
        return size - self.below[layer] - int((values < cut.threshold).sum()) - cut.ties[layer]

    def withdraw(self, layer: int, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Take protected units (at these positions, with these scores) out of the counts."""
        inside = self.inside[layer]
        drop = torch.zeros(inside.numel(), dtype=torch.bool)
        recorded = self.positions[layer] if self.positions is not None else None
        for position, value in zip(positions.tolist(), values.tolist()):
            if value < self.lo:
                self.below[layer] -= 1
            elif value <= self.hi:
                if recorded is not None:
                    drop[int(torch.searchsorted(recorded, position))] = True
                else:
                    drop[int(((inside == value) & ~drop).nonzero()[0])] = True
        self.inside[layer] = inside[~drop]
        if recorded is not None:
            self.positions[layer] = recorded[~drop]


def find_cut(score_fns: Sequence[ScoreFn], sizes: Sequence[int], k: int, min_kept: int = 0) -> Cut:
    """Find the :class:`Cut` pruning ``k`` units (fewer if ``min_kept`` forbids) of these layers."""
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"cannot prune {k} of {total} units")
    k = min(k, total - sum(min(min_kept, n) for n in sizes))
    protected: list[torch.Tensor | None] = [None] * len(sizes)
    if k == 0:
        return Cut(-math.inf, [0] * len(sizes), protected)
    if total <= SORT_LIMIT:
        scratch = None
        everything = [fn(None).reshape(-1).float().cpu().clone() for fn in score_fns]
        ranking: _Ranking | None = _Ranking(-math.inf, math.inf, [0] * len(sizes), everything)
        lo = hi = math.nan
    else:
        scratch = torch.empty(max(sizes), dtype=torch.float32)
        lo, hi = _sample_bracket(_sample(score_fns, sizes, scratch), k / total)
        ranking = None
    while True:
        if ranking is None:
            ranking = _bracket_pass(score_fns, scratch, lo, hi, protected)
        if ranking is None:  # too many scores inside the bracket to collect
            if _float_key(hi) - _float_key(lo) > 1:
                lo, hi = _narrow(score_fns, scratch, k, lo, hi, protected)
                continue
            cut, kept = _cut_between_neighbours(score_fns, scratch, k, lo, hi, protected)
        else:
            cut = ranking.cut(k, protected)
            if cut is None:
                lo, hi = (-math.inf, ranking.lo) if k <= sum(ranking.below) else (ranking.hi, math.inf)
                lo, hi = _narrow(score_fns, scratch, k, lo, hi, protected)
                ranking = None
                continue
            kept = [ranking.kept(i, n, cut) for i, n in enumerate(sizes)]
        starving = [i for i, n in enumerate(sizes) if protected[i] is None and kept[i] < min(min_kept, n)]
        if not starving:
            return cut
        for i in starving:
            scores = score_fns[i](scratch).reshape(-1)
            protected[i] = _protection(scores, min_kept)
            if ranking is not None:
                ranking.withdraw(i, protected[i].cpu(), scores[protected[i]].float().cpu())


def prune_lowest(score_fns: Sequence[Callable[[], torch.Tensor]], sizes: Sequence[int], k: int, min_kept: int = 0):
    """Flat bool keep-masks, one per layer, pruning the ``k`` lowest scores overall (see :func:`find_cut`).

    ``score_fns[i]()`` returns layer i's scores; convenient when the scores are at hand.
    """
    fns = [lambda out, fn=fn: fn().reshape(-1).float() for fn in score_fns]
    cut = find_cut(fns, sizes, k, min_kept)
    return [cut.keep(i, fn(None)) for i, fn in enumerate(fns)]


def _cut_between_neighbours(fns, scratch, k, lo, hi, protected) -> tuple[Cut, list[int]]:
    """v* is ``lo`` or ``hi``, adjacent float32 values shared by too many units to collect.
    Returns the cut and how many units each layer keeps."""

    def counts(predicate) -> list[int]:
        return [_count(predicate(fn(scratch).reshape(-1)), p) for fn, p in zip(fns, protected)]

    below, at_lo = counts(lambda s: s < lo), counts(lambda s: s == lo)
    if k <= sum(below) + sum(at_lo):
        threshold, available = lo, at_lo
    else:
        below = [b + a for b, a in zip(below, at_lo)]
        threshold, available = hi, counts(lambda s: s == hi)
    to_prune, ties = k - sum(below), []
    for count in available:
        ties.append(min(count, to_prune))
        to_prune -= ties[-1]
    sizes = [fn(scratch).numel() for fn in fns]
    kept = [n - b - t for n, b, t in zip(sizes, below, ties)]
    return Cut(threshold, ties, protected), kept


def _sample_size(total: int) -> int:
    if SAMPLE_SIZE is not None:
        return min(SAMPLE_SIZE, total)
    # The bracket holds about total·12σ/n ≤ total·6/√n scores; growing n with total keeps that near 2^19.
    wanted = (total * 6 / (1 << 19)) ** 2
    return int(min(max(wanted, 1 << 14), 1 << 20, total))


def _sample(score_fns, sizes, scratch) -> torch.Tensor:
    total = sum(sizes)
    sample_size = _sample_size(total)
    generator = torch.Generator().manual_seed(0)
    picked = []
    for fn, n in zip(score_fns, sizes):
        if n:
            positions = torch.randint(n, (max(1, round(sample_size * n / total)),), generator=generator)
            if hasattr(fn, "at"):  # scores of just these units, without scoring the whole layer
                picked.append(fn.at(positions).float().cpu())
            else:
                scores = fn(scratch).reshape(-1)
                picked.append(scores[positions.to(scores.device)].float().cpu())
    return torch.cat(picked)


def _sample_bracket(sample: torch.Tensor, q: float) -> tuple[float, float]:
    n = sample.numel()
    rank = q * n
    margin = 6.0 * math.sqrt(n * q * (1.0 - q)) + 8.0
    lo_rank, hi_rank = math.floor(rank - margin), math.ceil(rank + margin)
    lo = float(torch.kthvalue(sample, lo_rank + 1).values) if lo_rank >= 0 else -math.inf
    hi = float(torch.kthvalue(sample, hi_rank + 1).values) if hi_rank < n else math.inf
    # Pruned units (−inf) can be many: keep them below the bracket rather than inside it.
    return max(lo, -_LARGEST), min(hi, _LARGEST)


def _bracket_pass(fns, scratch, lo: float, hi: float, protected) -> _Ranking | None:
    """Count below ``lo`` and collect ``[lo, hi]``, per layer; None if too many lie inside."""
    below, inside, positions, tentative, n_inside = [], [], [], [], 0
    flags = torch.empty(scratch.numel(), dtype=torch.bool)
    more = torch.empty(scratch.numel(), dtype=torch.bool)
    words = torch.empty((scratch.numel() + 7) // 8, dtype=torch.int64)
    for fn, p in zip(fns, protected):
        scores = fn(scratch).reshape(-1)
        n = scores.numel()
        # Writing comparisons into reused buffers avoids page-faulting fresh memory every layer.
        on_cpu = scores.device.type == "cpu"
        at_least_lo = torch.ge(scores, lo, out=flags[:n]) if on_cpu else scores >= lo
        if p is not None:
            at_least_lo[p] = False
        below.append(n - (0 if p is None else p.numel()) - int(torch.count_nonzero(at_least_lo)))
        if inside is None:
            continue
        in_bracket = (torch.le(scores, hi, out=more[:n]) if on_cpu else scores <= hi).logical_and_(at_least_lo)
        where = in_bracket.nonzero().squeeze(1)
        n_inside += where.numel()
        if n_inside > CANDIDATE_LIMIT:
            inside = None
            continue
        inside.append(scores[where].float().cpu())
        positions.append(where.cpu())
        # Everything at or above lo is kept unless the cut says otherwise: record that, packed.
        tentative.append(pack_mask(at_least_lo, words).cpu())
    return None if inside is None else _Ranking(lo, hi, below, inside, positions, tentative)


def _float_key(x: float) -> int:
    """An integer whose order matches the float32 order (−inf lowest, +inf highest)."""
    (bits,) = struct.unpack("<i", struct.pack("<f", x))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF) - 1


def _key_float(key: int) -> float:
    bits = key if key >= 0 else (-key - 1) - 0x80000000
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _narrow(fns, scratch, k, lo, hi, protected):
    """Bisect [lo, hi] (which holds v*) on float32 bit patterns until few scores lie inside it."""

    def count(predicate) -> int:
        return sum(_count(predicate(fn(scratch).reshape(-1)), p) for fn, p in zip(fns, protected))

    lo_key, hi_key = _float_key(lo), _float_key(hi)
    while hi_key - lo_key > 1 and count(lambda s, lo=lo, hi=hi: (s >= lo) & (s <= hi)) > CANDIDATE_LIMIT:
        mid = _key_float((lo_key + hi_key) // 2)
        if count(lambda s, mid=mid: s <= mid) >= k:
            hi, hi_key = mid, _float_key(mid)
        else:
            lo, lo_key = mid, _float_key(mid)
    return lo, hi
