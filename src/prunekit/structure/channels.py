"""Channel ids: every index of every traced tensor dimension gets a number, and couplings join numbers.

While a model runs under the tracer, each parameter dimension that can shrink (a Linear's rows and
columns, a conv's filters and input channels, a norm's features, ...) is given a contiguous range of
ids, one per index. An operation that forces two indices to be removed together (a residual add, a
layer consuming a channel, an attention head) records an *edge* between their ids. After the trace,
the connected components of that graph are the units of structured pruning: removing one component
removes every index in it, from every tensor it touches, and nothing else.

Id 0 is the *pinned* sentinel: a component joined to it can never be removed (it reaches a model
output, passes through an operation whose result would change, or enters an excluded module).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PINNED = 0

#: Joins and pins of at most this many ids are stored as given and filtered all at once in
#: :meth:`ChannelGraph.components` (a layer's few thousand channels: a dozen small torch calls saved per
#: operation); larger ones (labels that vary over pixels or tokens) are deduplicated at once to save memory.
_DEFER_UP_TO = 1 << 14


@dataclass(eq=False)
class DimRange:
    """The ids ``start .. start + size - 1`` name the indices of dimension ``dim`` of ``owner.<tensor>``."""

    start: int
    owner: str  # the module's name in the model ("" for the root)
    tensor: str  # parameter or buffer name on that module
    dim: int
    size: int
    producer: bool  # True when these indices create channels (a layer's output dimension)
    consumer: bool = False  # True when they read channels (a layer's input dimension)
    ids: torch.Tensor | None = field(default=None, repr=False)  # the ids as a tensor, made once

    @property
    def tensor_name(self) -> str:
        return f"{self.owner}.{self.tensor}" if self.owner else self.tensor


class ChannelGraph:
    """Id allocation, edges and pins; :meth:`components` resolves them once the trace is over."""

    def __init__(self):
        self.ranges: list[DimRange] = []
        self._by_key: dict[tuple[str, str, int], DimRange] = {}
        self._next = 1  # 0 is PINNED
        self._edges: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pins: list[torch.Tensor] = []
        self._pinned_labels: list[torch.Tensor] = []

    def ids(
        self, owner: str, tensor: str, dim: int, size: int, producer: bool = False, consumer: bool = False
    ) -> torch.Tensor:
        """The ids of ``owner.<tensor>``'s dimension ``dim`` (allocated on first use), as an int64 vector
        (shared between calls: do not modify it in place)."""
        key = (owner, tensor, dim)
        found = self._by_key.get(key)
        if found is None:
            found = DimRange(self._next, owner, tensor, dim, size, producer)
            self._next += size
            self.ranges.append(found)
            self._by_key[key] = found
        found.producer |= producer
        found.consumer |= consumer
        if found.size != size:
            raise RuntimeError(f"{found.tensor_name} dimension {dim} changed size during the trace")
        if found.ids is None:
            found.ids = torch.arange(found.start, found.start + size, dtype=torch.int64)
        return found.ids

    def join(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Couple ``a[i]`` with ``b[i]`` for every i (ids ≥ 0; negative entries are ignored)."""
        if a.shape == b.shape and a.ndim > 1:
            a, b = _drop_repeats(torch.stack([a, b]))
        if a.ndim != 1 or b.ndim != 1:  # (a torch call saved per side in the usual 1-D case)
            a, b = a.reshape(-1), b.reshape(-1)
        if a.numel() <= _DEFER_UP_TO:
            self._edges.append((a, b))
            return
        keep = _valid_pairs(a, b)
        if bool(keep.any()):
            # One int64 key per pair makes the deduplication a fast 1-D unique (ids stay below 2**31).
            keys = torch.unique((a[keep] << 32) | b[keep])
            self._edges.append((keys >> 32, keys & 0xFFFFFFFF))

    def pin(self, ids: torch.Tensor) -> None:
        """Make the components of these ids unremovable (negative entries are ignored)."""
        if ids.ndim > 1:
            ids = _drop_repeats(ids)
        if ids.ndim != 1:
            ids = ids.reshape(-1)
        if ids.numel() <= _DEFER_UP_TO:
            self._pins.append(ids)
            return
        ids = ids[ids > PINNED]
        if ids.numel():
            self._pins.append(torch.unique(ids))

    def pin_labels(self, labels: torch.Tensor) -> None:
        """Pin the channels of tracer labels (``2·id + z``, see :mod:`.trace`) whose z is 0, i.e. that are not
        zero where pruned; the decoding waits for :meth:`components`, one pass for all of them."""
        self._pinned_labels.append(labels if labels.ndim == 1 else labels.reshape(-1))

    @property
    def size(self) -> int:
        return self._next

    def components(self) -> torch.Tensor:
        """``root[id]``: the smallest id of each id's component (so pinned components have root 0)."""
        root = torch.arange(self._next, dtype=torch.int64)
        firsts = [a for a, _ in self._edges]
        seconds = [b for _, b in self._edges]
        pins = list(self._pins)
        if self._pinned_labels:
            labels = torch.cat(self._pinned_labels)
            pins.append(torch.where(labels & 1 == 0, labels >> 1, -1))  # −1 (odd) stays −1: ignored
        if pins:
            pins = torch.cat(pins)
            firsts.append(torch.zeros_like(pins))
            seconds.append(pins)
        if not firsts:
            return root
        a, b = torch.cat(firsts), torch.cat(seconds)
        # The small joins and pins were stored unfiltered: a pair with a negative id (plain data) becomes a
        # self-loop of id 0, which changes nothing (cheaper than dropping it).
        valid = (a >= 0) & (b >= 0)
        a, b = torch.where(valid, a, 0), torch.where(valid, b, 0)
        # Min-label propagation with pointer jumping: each round every edge pulls both ends to the smaller
        # root, then roots follow their own roots; it ends when no edge joins two different roots.
        # (index_select, clamp_max and torch.equal: several times faster on CPU than root[a], torch.minimum
        # and (x == y).all() on vectors this long.)
        while True:
            ra, rb = root.index_select(0, a), root.index_select(0, b)
            if torch.equal(ra, rb):
                return root
            low = ra.clamp_max(rb)
            root.scatter_reduce_(0, ra, low, reduce="amin")
            root.scatter_reduce_(0, rb, low, reduce="amin")
            while True:
                jumped = root.index_select(0, root)
                if torch.equal(jumped, root):
                    break
                root = jumped


def _valid_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a >= 0) & (b >= 0) & (a != b)


def _drop_repeats(ids: torch.Tensor) -> torch.Tensor:
    """Keep one slice along every dimension (after the first) whose slices are all equal: activations
    repeat the same channel ids over batch, tokens and pixels, and deduplicating them first is cheaper."""
    for dim in range(ids.ndim - 1, 0, -1):
        if ids.shape[dim] > 1:
            first = ids.narrow(dim, 0, 1)
            if bool((ids == first).all()):
                ids = first
    return ids
