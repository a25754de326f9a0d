"""Selection: given unit scores, decide exactly which units to prune.

Over 400 lines because it is one algorithm (sample, bracket, count, narrow), whose passes share
small private helpers that mean nothing on their own.

:func:`find_cut` finds where to cut so that exactly ``k`` units are pruned across a list of layers
(one layer for local scope, many for global scope): the ``k`` lowest scores go, and among equal
scores the unit that comes first (layer order, then position in the layer) goes first. Every layer
keeps at least ``min_kept`` units (its best ones), so global pruning never empties a layer.

Scores are never concatenated into one big vector when there are many of them: ``torch.kthvalue``
or ``torch.quantile`` on a concatenation needs copies of every score at once (and
``torch.nn.utils.prune.global_unstructured`` does that). Here the cut is found in passes over one
layer at a time, so the extra memory is one layer's scores plus a small sample:

1. a random sample of the scores, taken in short runs of consecutive units (cheap to read),
   brackets the k-th smallest value v* between two sample order statistics ``lo ≤ v* ≤ hi`` (a band
   of ±6σ around the sample rank, σ estimated from the sample as in stratified cluster sampling);
2. one pass counts the scores below ``lo`` and keeps the few in ``[lo, hi]``, from which v* and
   the number of ties to prune in each layer are read exactly;
3. a layer that would keep fewer than ``min_kept`` units gets its best units taken out of the
   competition (they are kept), and v* is read again from the same counts;
4. the caller builds each layer's mask from :meth:`Cut.keep` (or :meth:`Cut.keeps_above`), one
   layer at a time, scoring it again: cheaper than recording positions in step 2.

If the sample misleads (very unlikely) the bracket is narrowed by bisection over the float32 bit
patterns with counting passes, so memory stays bounded either way. Scores on an accelerator (a GPU),
up to :attr:`Tuning.device_sort_limit` of them, are instead concatenated there and ranked with one
sort: a GPU has the memory, and a layer-by-layer counting pass would spend its time
launching small kernels and waiting for their counts. Scores are float32; a unit that
is already pruned should score −inf.
"""

from __future__ import annotations

import contextvars
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

#: ``fn(out)`` returns one layer's flat float32 scores; it may write them into ``out`` (a scratch
#: buffer at least that long, or None) and the result is only read until the next call. It may say
#: where its scores live (``fn.device``; the CPU if it does not). It may also
#: offer ``fn.runs(starts, length)``, the scores of the ``length`` consecutive units from each of
#: those flat positions alone (run after run), which makes sampling cheap,
#: and ``fn.signed_scores``: a flat float32 tensor x whose |x| are exactly the scores (or None), which
#: lets the counting pass use fused ops on x instead of scoring and comparing.
ScoreFn = Callable[[torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class Tuning:
    """Knobs of the selection algorithm; they change its speed and memory, never its result.

    Attributes:
        sort_limit: up to this many units in all, scores are concatenated and sorted (fast; the
            result is the same as the counting passes').
        device_sort_limit: up to this many units in all, scores that live on an accelerator are ranked
            there, concatenated (1 GiB of float32 at most): one sort beats a counting pass that
            launches kernels layer by layer.
        sample_size: scores sampled to bracket the threshold; None grows it with the number of units.
        select_by_words_from: from this many units on, selection scans 8 flags at a time.
        bracket_sigmas: half-width of the sampled bracket in standard deviations of the sample rank.
        candidate_limit: candidate scores held at once in the second pass (4 bytes each).
    """

    sort_limit: int = 1 << 22
    device_sort_limit: int = 1 << 28
    sample_size: int | None = None
    select_by_words_from: int = 1 << 16
    bracket_sigmas: float = 6.0
    candidate_limit: int = 1 << 24


# Tuning is frozen, so one shared default is safe.
_TUNING: contextvars.ContextVar[Tuning] = contextvars.ContextVar("prunekit_selection_tuning", default=Tuning())  # noqa: B039


@contextmanager
def tuned(**changes: Any) -> Iterator[Tuning]:
    """Run the enclosed selections with some :class:`Tuning` fields changed, e.g.
    ``with tuned(sort_limit=0): ...`` forces the counting passes (tests use it to compare paths)."""
    token = _TUNING.set(replace(_TUNING.get(), **changes))
    try:
        yield _TUNING.get()
    finally:
        _TUNING.reset(token)


_LARGEST = struct.unpack("<f", struct.pack("<i", 0x7F7FFFFF))[0]  # the largest finite float32


@dataclass
class Cut:
    """Where to cut: in layer i, keep the ``protected[i]`` units, prune the other units scoring below
    ``threshold`` and the first ``ties[i]`` of those scoring exactly ``threshold``; keep the rest.
    ``at_threshold[i]``, when known, counts layer i's competing (unprotected) units at ``threshold``."""

    threshold: float
    ties: list[int]
    protected: list[torch.Tensor | None]
    at_threshold: list[int] | None = None

    def keeps_above(self, layer: int) -> float | None:
        """A float t such that the layer keeps exactly its protected units and the units scoring
        above t, or None when no t says it (only some of the units at the threshold pruned).

        Usually every layer but one is in this case, and a single comparison builds its mask."""
        if self.at_threshold is None:
            return None
        ties, threshold = self.ties[layer], self.threshold
        if ties == self.at_threshold[layer]:  # all units at the threshold go
            return threshold
        if ties == 0 and math.isfinite(threshold):  # all stay: score ≥ threshold ⇔ score > the float below
            return _float_below(threshold)
        return None

    def keep(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        """Flat bool keep-mask of ``layer`` given its scores (as its score function returns them)."""
        scores = scores.reshape(-1)
        protected, above = self.protected[layer], self.keeps_above(layer)
        if above is not None:
            keep = scores > above
            if protected is not None:
                keep[protected] = True
            return keep
        ties = self.ties[layer]
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
    above = _positions(scores > last) if count > 1 else scores.new_empty(0, dtype=torch.int64)
    ties = _positions(scores == last)
    return torch.cat([above, ties[ties.numel() - (count - above.numel()) :]])


def _count(flags: torch.Tensor, protected: torch.Tensor | None) -> int:
    """How many flags are set outside the protected positions (which take no part in the ranking)."""
    if protected is not None:
        flags[protected] = False
    return int(torch.count_nonzero(flags))


def _kth_smallest(values: torch.Tensor, rank: int) -> float:
    """The ``rank``-th smallest (1-based) of a float tensor. On the CPU numpy's introselect is an order
    of magnitude faster than ``torch.kthvalue`` (it needs no indices). On a GPU a full radix sort is:
    ``torch.kthvalue`` selects within one thread block per slice, which is slow for one long slice
    (benchmarks/results/gpu_check.md)."""
    if values.device.type != "cpu":
        return float(torch.sort(values).values[rank - 1])
    return float(np.partition(values.numpy(), rank - 1)[rank - 1])


class _Ranking:
    """What is known about the competing scores: per layer, how many lie below ``lo`` and the values
    in ``[lo, hi]`` (protected units excluded)."""

    def __init__(self, lo, hi, below: list[int], inside: list[torch.Tensor]):
        self.lo, self.hi, self.below, self.inside = lo, hi, below, inside

    def cut(self, k: int, protected: list[torch.Tensor | None]) -> Cut | None:
        """The cut if v* lies in ``[lo, hi]``; None if it lies outside."""
        below = sum(self.below)
        values = torch.cat(self.inside) if self.inside else torch.empty(0)
        if not below < k <= below + values.numel():
            return None
        threshold = _kth_smallest(values, k - below)
        to_prune = k - below - int((values < threshold).sum())
        ties, at_threshold = [], []
        for layer_values in self.inside:
            at_threshold.append(int((layer_values == threshold).sum()))
            ties.append(min(at_threshold[-1], to_prune))
            to_prune -= ties[-1]
        return Cut(threshold, ties, protected, at_threshold)

    def kept(self, layer: int, size: int, cut: Cut) -> int:
        values = self.inside[layer]
        return size - self.below[layer] - int((values < cut.threshold).sum()) - cut.ties[layer]

    def withdraw(self, layer: int, values: torch.Tensor) -> None:
        """Take protected units (with these scores) out of the counts. Only the multiset of values
        inside the bracket matters, so one value equal to each withdrawn score is dropped."""
        inside = self.inside[layer]
        drop = torch.zeros(inside.numel(), dtype=torch.bool, device=inside.device)
        for value in values.tolist():
            if value < self.lo:
                self.below[layer] -= 1
            elif value <= self.hi:
                drop[int(((inside == value) & ~drop).nonzero()[0])] = True
        self.inside[layer] = inside[~drop]


def find_cut(score_fns: Sequence[ScoreFn], sizes: Sequence[int], k: int, min_kept: int = 0) -> Cut:
    """Find the :class:`Cut` pruning ``k`` units (fewer if ``min_kept`` forbids) of these layers."""
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"cannot prune {k} of {total} units")
    k = min(k, total - sum(min(min_kept, n) for n in sizes))
    protected: list[torch.Tensor | None] = [None] * len(sizes)
    if k == 0:
        return Cut(-math.inf, [0] * len(sizes), protected)
    devices = {getattr(fn, "device", torch.device("cpu")) for fn in score_fns}
    on_device = len(devices) == 1 and next(iter(devices)).type != "cpu" and total <= _TUNING.get().device_sort_limit
    if total <= _TUNING.get().sort_limit or on_device:
        scratch = None
        home = next(iter(devices)) if on_device else torch.device("cpu")
        everything = [fn(None).reshape(-1).float().to(home).clone() for fn in score_fns]
        ranking: _Ranking | None = _Ranking(-math.inf, math.inf, [0] * len(sizes), everything)
        lo = hi = math.nan
    else:
        scratch = torch.empty(max(sizes), dtype=torch.float32)
        lo, hi = _sample_bracket(*_sample(score_fns, sizes, scratch), k / total)
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
                ranking.withdraw(i, scores[protected[i]].float().cpu())


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
    return Cut(threshold, ties, protected, available), kept


def _sample_size(total: int) -> int:
    sample_size = _TUNING.get().sample_size
    if sample_size is not None:
        return min(sample_size, total)
    # Sampled in runs, a unit costs a few ns, so 2% of the units cost a fraction of one pass over
    # them, while a larger sample narrows the bracket, which makes the counting pass cheaper (_select).
    return int(min(max(total // 50, 1 << 14), 1 << 20, total))


#: Units are sampled in runs of this many consecutive units: a random unit costs a cache miss
#: (tens of nanoseconds), its neighbours in the same 64-byte line almost nothing.
SAMPLE_RUN = 16


def _sample(score_fns, sizes, scratch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled scores (each layer in proportion to its size), the index of the run each belongs to,
    and the layer of each run."""
    total = sum(sizes)
    sample_size = _sample_size(total)
    generator = torch.Generator().manual_seed(0)
    picked, runs, layers, n_runs = [], [], [], 0
    for layer, (fn, n) in enumerate(zip(score_fns, sizes)):
        if n:
            length = min(SAMPLE_RUN, n)
            count = max(1, round(sample_size * n / total / length))
            starts = torch.randint(n - length + 1, (count,), generator=generator)
            if hasattr(fn, "runs"):  # scores of just these units, without scoring the whole layer
                picked.append(fn.runs(starts, length).float().cpu())
            else:
                scores = fn(scratch).reshape(-1)
                picked.append(runs_of(scores, starts, length).float().cpu())
            runs.append(torch.arange(n_runs, n_runs + count).repeat_interleave(length))
            layers.append(torch.full((count,), layer))
            n_runs += count
    return torch.cat(picked), torch.cat(runs), torch.cat(layers)


def runs_of(values: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """``values[start : start + length]`` for each start, one after the other: rows of the sliding-window
    view, each copied whole (index_select copies rows ten times faster than indexing with [])."""
    return values.unfold(0, length, 1).index_select(0, starts.to(values.device)).reshape(-1)


def _kth_of_side(order: np.ndarray, start: int, stop: int, rank: int) -> float:
    """The ``rank``-th smallest (0-based) of ``order``, partitioned around ``start − 1`` or ``stop``
    already; looked for in ``order[start:stop]`` when it lies there (the margin makes it so)."""
    if not start <= rank < stop:
        return float(np.partition(order, rank)[rank])
    side = order[start:stop]
    side.partition(rank - start)
    return float(side[rank - start])


def _sample_bracket(sample: torch.Tensor, runs: torch.Tensor, layers: torch.Tensor, q: float) -> tuple[float, float]:
    """Scores ``lo ≤ hi`` that very likely bracket the q-quantile of all scores, from a sample taken
    in runs (see :func:`_sample`)."""
    n = sample.numel()
    rank = q * n
    # σ of the rank of the true q-quantile in the sample. Units of a run may be alike (one filter's
    # weights) and layers differ, so estimate it as in stratified cluster sampling, each layer a
    # stratum and each run a cluster: Σ_layers m/(m−1)·Σ_runs (y − p·x)², with y the run's units
    # ≤ the estimated quantile, x its length, p the layer's fraction and m its number of runs.
    # Partitioned in place around the estimate, so lo and hi are then looked for on either side.
    order = sample.numpy().copy()
    middle = min(n, max(1, round(rank))) - 1
    order.partition(middle)
    estimate = float(order[middle])
    at_most = sample <= estimate
    if n == SAMPLE_RUN * layers.numel():  # every run full length (no layer smaller than a run)
        y = at_most.view(-1, SAMPLE_RUN).sum(1, dtype=torch.float64)
        x = torch.full_like(y, SAMPLE_RUN)
    else:
        y = torch.bincount(runs, weights=at_most.double())
        x = torch.bincount(runs).double()
    m = torch.bincount(layers).double()
    p = torch.bincount(layers, weights=y) / torch.bincount(layers, weights=x).clamp_min(1)
    squares = torch.bincount(layers, weights=(y - p[layers] * x) ** 2, minlength=m.numel())
    # A layer with a single run says nothing about its spread: count its units as independent.
    single = torch.bincount(layers, weights=x, minlength=m.numel()) * (q * (1.0 - q))
    variance = torch.where(m > 1, squares * m / (m - 1).clamp_min(1), single)
    margin = _TUNING.get().bracket_sigmas * math.sqrt(float(variance.sum())) + 8.0
    lo_rank, hi_rank = math.floor(rank - margin), math.ceil(rank + margin)
    lo = _kth_of_side(order, 0, middle, lo_rank) if lo_rank >= 0 else -math.inf
    hi = _kth_of_side(order, middle + 1, n, hi_rank) if hi_rank < n else math.inf
    # Pruned units (−inf) can be many: keep them below the bracket rather than inside it.
    return max(lo, -_LARGEST), min(hi, _LARGEST)


def _bracket_pass(fns, scratch, lo: float, hi: float, protected) -> _Ranking | None:
    """Count below ``lo`` and collect the values in ``[lo, hi]``, per layer; None if too many lie inside."""
    below, inside, n_inside = [], [], 0
    # Writing into reused buffers avoids page-faulting fresh memory every layer.
    flags = torch.empty(scratch.numel(), dtype=torch.bool)
    more = torch.empty(scratch.numel(), dtype=torch.bool)
    for fn, p in zip(fns, protected):
        signed = getattr(fn, "signed_scores", None)
        absolute = signed is not None and signed.device.type == "cpu" and lo > 0
        if absolute:  # the values selected below are then x, not |x|
            at_least_lo, in_bracket, scores = _classify_signed(signed, lo, hi, scratch, flags, more)
        else:
            scores = fn(scratch).reshape(-1)
            n = scores.numel()
            on_cpu = scores.device.type == "cpu"
            at_least_lo = torch.ge(scores, lo, out=flags[:n]) if on_cpu else scores >= lo
            in_bracket = (torch.le(scores, hi, out=more[:n]) if on_cpu else scores <= hi).logical_and_(at_least_lo)
        if p is not None:
            at_least_lo[p] = False
            in_bracket[p] = False
        n = at_least_lo.numel()
        below.append(n - (0 if p is None else p.numel()) - int(torch.count_nonzero(at_least_lo)))
        if inside is None:
            continue
        values = _select(scores, in_bracket)
        n_inside += values.numel()
        if n_inside > _TUNING.get().candidate_limit:
            inside = None
            continue
        inside.append((values.abs() if absolute else values).float().cpu())
    return None if inside is None else _Ranking(lo, hi, below, inside)


def _classify_signed(x: torch.Tensor, lo: float, hi: float, scratch, flags, more):
    """For scores |x| (``0 < lo ≤ hi``): the flags "score ≥ lo" and "lo ≤ score ≤ hi", and the tensor
    (x) to select the bracket's values from (take their absolute values).

    ``hardshrink(x, t)`` keeps x exactly where |x| > t and zeroes the rest in one fused pass, and
    float→bool conversion is cheaper than a comparison, so this beats |x| followed by two comparisons.
    """
    n = x.numel()
    kept = torch.hardshrink(x, _float_below(lo), out=scratch[:n])  # |x| ≥ lo
    at_least_lo = flags[:n].copy_(kept)
    above_hi = more[:n].copy_(torch.hardshrink(kept, hi, out=kept))
    return at_least_lo, above_hi.logical_xor_(at_least_lo), x


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """``mask.nonzero().squeeze(1)`` for a sparse flat bool ``mask``, 8 flags at a time (see _select)."""
    n = mask.numel()
    whole = n - n % 8
    if n < _TUNING.get().select_by_words_from or mask.storage_offset() % 8 or not mask.is_contiguous():
        return mask.nonzero().squeeze(1)
    words = mask[:whole].view(torch.int64).nonzero().squeeze(1)
    flags = mask[:whole].view(-1, 8).index_select(0, words).reshape(-1)
    found = (words.unsqueeze(1) * 8 + torch.arange(8, device=mask.device)).reshape(-1).masked_select(flags)
    return torch.cat([found, whole + mask[whole:].nonzero().squeeze(1)])


def _select(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values[mask]`` for a sparse flat bool ``mask``. ``nonzero`` costs about a nanosecond per
    entry scanned however few are set, so it scans the mask 8 flags at a time (as int64 words) and
    then looks inside the few words that have any flag set."""
    n = mask.numel()
    whole = n - n % 8
    if (
        n < _TUNING.get().select_by_words_from
        or mask.storage_offset() % 8
        or not mask.is_contiguous()
        or not values.is_contiguous()
    ):
        return values[mask]
    words = mask[:whole].view(torch.int64).nonzero().squeeze(1)
    flags = mask[:whole].view(-1, 8).index_select(0, words).reshape(-1)
    picked = values[:whole].view(-1, 8).index_select(0, words).reshape(-1).masked_select(flags)
    if whole < n:
        picked = torch.cat([picked, values[whole:][mask[whole:]]])
    return picked


def _float_key(x: float) -> int:
    """An integer whose order matches the float32 order (−inf lowest, +inf highest)."""
    (bits,) = struct.unpack("<i", struct.pack("<f", x))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF) - 1


def _key_float(key: int) -> float:
    bits = key if key >= 0 else (-key - 1) - 0x80000000
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _float_below(x: float) -> float:
    """The largest float32 below ``x`` (for the float32 scores, ``s > _float_below(x)`` ⇔ ``s ≥ x``;
    stepping the bit pattern would give −0.0 below +0.0, which compares equal)."""
    return float(np.nextafter(np.float32(x), np.float32(-math.inf)))


def _narrow(fns, scratch, k, lo, hi, protected):
    """Bisect [lo, hi] (which holds v*) on float32 bit patterns until few scores lie inside it."""

    def count(predicate) -> int:
        return sum(_count(predicate(fn(scratch).reshape(-1)), p) for fn, p in zip(fns, protected))

    lo_key, hi_key = _float_key(lo), _float_key(hi)
    while hi_key - lo_key > 1 and count(lambda s, lo=lo, hi=hi: (s >= lo) & (s <= hi)) > _TUNING.get().candidate_limit:
        mid = _key_float((lo_key + hi_key) // 2)
        if count(lambda s, mid=mid: s <= mid) >= k:
            hi, hi_key = mid, _float_key(mid)
        else:
            lo, lo_key = mid, _float_key(mid)
    return lo, hi
