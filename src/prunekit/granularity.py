"""Granularity: which weights are pruned together (one *unit*).

Every granularity works on the ``(O, I, K)`` view of a weight (see :mod:`prunekit.targets`):

=================  ==========================================================  ==================
name               one unit is                                                  units per layer
=================  ==========================================================  ==================
``"weight"``       a single weight (unstructured)                               O·I·K
``"kernel"``       one kh×kw slice ``W[o, i]`` of a conv (a single weight       O·I
                   for a Linear)
``"out_channel"``  a whole output unit ``W[o]``: a filter or a neuron, and       O
                   its bias
``"in_channel"``   a whole input feature/channel ``W[:, i]``                    I
``Block(h, w)``    an h×w tile of the 2-D matrix ``W.reshape(O, I·K)``;         ⌈O/h⌉·⌈I·K/w⌉
                   edge tiles may be smaller
``NM(n, m)``       N:M: in every run of m consecutive weights along the input   —
                   dimension keep the n best (2:4 for sparse tensor cores)
=================  ==========================================================  ==================

A unit's score is a norm of its members' scores: the L1 norm (their sum) by default, the L2 norm
for the ``"l2"`` criterion (the criterion chooses, see :mod:`prunekit.criteria`).
Sparsity always counts units: 0.5 with ``"out_channel"`` removes half of the filters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .targets import Target


class Granularity:
    """Base class: how element scores become unit scores and unit decisions become a mask."""

    name = "granularity"
    #: Whether pruning a unit also zeroes the layer's bias entry (only when a unit is a whole output).
    prunes_bias = False

    def validate(self, target: Target) -> None:
        """Raise ``ValueError`` if this granularity cannot be applied to ``target``."""

    def unit_scores(self, scores: torch.Tensor, reduce: str) -> torch.Tensor:
        """Reduce element scores ``(O, I, K)`` to one flat score per unit."""
        raise NotImplementedError

    def expand(self, keep_units: torch.Tensor, oik_shape: tuple[int, int, int]) -> torch.Tensor:
        """Turn a flat per-unit keep vector into an ``(O, I, K)`` element mask."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return repr(self.name)


def _reduce(scores: torch.Tensor, dims: tuple[int, ...], reduce: str) -> torch.Tensor:
    if reduce == "l2":
        return scores.square().sum(dim=dims).sqrt()
    return scores.sum(dim=dims)


class Weight(Granularity):
    name = "weight"

    def unit_scores(self, scores, reduce):
        return scores.reshape(-1)

    def expand(self, keep_units, oik_shape):
        return keep_units.reshape(oik_shape)


class Kernel(Granularity):
    name = "kernel"

    def unit_scores(self, scores, reduce):
        return _reduce(scores, (2,), reduce).reshape(-1)

    def expand(self, keep_units, oik_shape):
        out_dim, in_dim, kernel = oik_shape
        return keep_units.reshape(out_dim, in_dim, 1).expand(oik_shape)


class OutChannel(Granularity):
    name = "out_channel"
    prunes_bias = True

    def unit_scores(self, scores, reduce):
        return _reduce(scores, (1, 2), reduce)

    def expand(self, keep_units, oik_shape):
        return keep_units.reshape(-1, 1, 1).expand(oik_shape)


class InChannel(Granularity):
    name = "in_channel"

    def unit_scores(self, scores, reduce):
        return _reduce(scores, (0, 2), reduce)

    def expand(self, keep_units, oik_shape):
        return keep_units.reshape(1, -1, 1).expand(oik_shape)


class Block(Granularity):
    """h×w tiles of the weight seen as a matrix ``(O, I·K)``; tiles on the right/bottom edge may be smaller."""

    def __init__(self, height: int, width: int):
        for what, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Block {what} must be a positive integer, got {value!r}")
        self.height, self.width = height, width
        self.name = f"Block({height}, {width})"

    def _padded(self, tensor2d: torch.Tensor) -> torch.Tensor:
        rows, cols = tensor2d.shape
        pad_rows, pad_cols = (-rows) % self.height, (-cols) % self.width
        return F.pad(tensor2d, (0, pad_cols, 0, pad_rows))

    def unit_scores(self, scores, reduce):
        matrix = self._padded(scores.reshape(scores.shape[0], -1))
        rows, cols = matrix.shape
        tiles = matrix.reshape(rows // self.height, self.height, cols // self.width, self.width)
        return _reduce(tiles, (1, 3), reduce).reshape(-1)

    def expand(self, keep_units, oik_shape):
        out_dim, in_dim, kernel = oik_shape
        block_rows = -(-out_dim // self.height)
        tiles = keep_units.reshape(block_rows, -1)
        full = tiles.repeat_interleave(self.height, 0).repeat_interleave(self.width, 1)
        return full[:out_dim, : in_dim * kernel].reshape(oik_shape)

    def __eq__(self, other):
        return isinstance(other, Block) and (self.height, self.width) == (other.height, other.width)

    def __hash__(self):
        return hash(("Block", self.height, self.width))


class NM(Granularity):
    """N:M sparsity: in every group of m consecutive weights along the input dimension, keep n.

    For a Linear the groups run along ``in_features``; for a conv, along the input channels at each
    output channel and kernel position (the layout sparse tensor cores use for 2:4 after the usual
    channels-last permutation). ``m`` must divide the input dimension. The sparsity is fixed at
    1 − n/m; under a gradual schedule a group first keeps m−1, then m−2, … down to n weights.
    """

    def __init__(self, n: int, m: int):
        for what, value in (("n", n), ("m", m)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"NM {what} must be an integer, got {value!r}")
        if not 0 < n < m:
            raise ValueError(f"NM(n, m) needs 0 < n < m (keep n of every m weights), got NM({n}, {m})")
        self.n, self.m = n, m
        self.name = f"NM({n}, {m})"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def validate(self, target):
        in_dim = target.oik_shape[1]
        if in_dim % self.m:
            raise ValueError(
                f"{self.name} needs the input dimension of layer {target.name!r} ({in_dim}) to be a "
                f"multiple of m={self.m}; exclude that layer (exclude=[{target.name!r}]) or choose another m"
            )

    def group_keep(self, scores: torch.Tensor, prune_per_group: int) -> torch.Tensor:
        """Keep mask ``(O, I, K)`` pruning the ``prune_per_group`` lowest scores of every group of m.

        Ties within a group prune the earlier position first (stable sort), so the result is deterministic.
        """
        out_dim, in_dim, kernel = scores.shape
        groups = scores.reshape(out_dim, in_dim // self.m, self.m, kernel).transpose(2, 3)
        order = torch.sort(groups, dim=-1, stable=True).indices
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(self.m, device=scores.device).expand_as(order))
        keep = ranks >= prune_per_group
        return keep.transpose(2, 3).reshape(out_dim, in_dim, kernel)

    def __eq__(self, other):
        return isinstance(other, NM) and (self.n, self.m) == (other.n, other.m)

    def __hash__(self):
        return hash(("NM", self.n, self.m))


GRANULARITIES: dict[str, type[Granularity]] = {
    "weight": Weight,
    "kernel": Kernel,
    "out_channel": OutChannel,
    "in_channel": InChannel,
}


def get_granularity(spec: str | Granularity) -> Granularity:
    """Turn a granularity name or instance into a :class:`Granularity`."""
    if isinstance(spec, Granularity):
        return spec
    if isinstance(spec, str):
        try:
            return GRANULARITIES[spec]()
        except KeyError:
            valid = ", ".join(repr(name) for name in GRANULARITIES)
            raise ValueError(
                f"unknown granularity {spec!r}; valid names are {valid}, or pass pk.Block(h, w) or pk.NM(n, m)"
            ) from None
    raise TypeError(f"granularity must be a name or a prunekit granularity such as pk.NM(2, 4), got {spec!r}")
