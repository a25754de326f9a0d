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

Add a granularity in one file: subclass :class:`Granularity`, say how it groups weights into units
(:meth:`Granularity.unit_scores`, :meth:`Granularity.expand`), how many units a layer has
(:meth:`Granularity.num_units`) and, if units are chosen within fixed groups rather than ranked
against each other (N:M), override :meth:`Granularity.keep_within_groups`; register it by name with
:func:`register_granularity`.

A unit's score is a norm of its members' scores: the L1 norm (their sum) by default, the L2 norm
for the ``"l2"`` criterion (the criterion chooses, see :mod:`prunekit.criteria`).
Sparsity always counts units: 0.5 with ``"out_channel"`` removes half of the filters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.targets import Target, check_sparsity


class Granularity:
    """Base class: how element scores become unit scores and unit decisions become a mask."""

    name = "granularity"
    #: Whether pruning a unit also zeroes the layer's bias entry (only when a unit is a whole output).
    prunes_bias = False
    #: Whether a unit is one weight, in the weight's own order (unit scores are the element scores).
    is_single_weight = False
    #: Whether units are chosen within fixed groups of every layer (N:M) instead of ranked against each
    #: other; such a granularity fixes the sparsity (:attr:`fixed_sparsity`) and overrides
    #: :meth:`keep_within_groups`, and scopes do not apply to it.
    selects_within_groups = False
    #: The sparsity the granularity itself fixes (N:M: 1 − n/m), or None.
    fixed_sparsity: float | None = None
    #: Units are whole output channels, which structured pruning couples across layers (with
    #: ``example_inputs``) and :func:`prunekit.compact` can remove.
    whole_output_channels = False

    def validate(self, target: Target) -> None:
        """Raise ``ValueError`` if this granularity cannot be applied to ``target``."""

    def num_units(self, oik_shape: tuple[int, int, int]) -> int:
        """How many units a weight of this ``(O, I, K)`` shape has."""
        return self.unit_scores(torch.zeros(oik_shape), "sum").numel()

    def keep_within_groups(self, scores_oik: torch.Tensor, sparsity: float) -> torch.Tensor:
        """For granularities that select within groups: the ``(O, I, K)`` keep mask at ``sparsity``
        (already pruned weights score −inf)."""
        raise NotImplementedError(f"granularity {self.name!r} ranks units; it does not select within groups")

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
    is_single_weight = True

    def num_units(self, oik_shape):
        return math.prod(oik_shape)

    def unit_scores(self, scores, reduce):
        return scores.reshape(-1)

    def expand(self, keep_units, oik_shape):
        return keep_units.reshape(oik_shape)


class Kernel(Granularity):
    name = "kernel"

    def num_units(self, oik_shape):
        return oik_shape[0] * oik_shape[1]

    def unit_scores(self, scores, reduce):
        return _reduce(scores, (2,), reduce).reshape(-1)

    def expand(self, keep_units, oik_shape):
        out_dim, in_dim, kernel = oik_shape
        return keep_units.reshape(out_dim, in_dim, 1).expand(oik_shape)


class OutChannel(Granularity):
    name = "out_channel"
    prunes_bias = True
    whole_output_channels = True

    def num_units(self, oik_shape):
        return oik_shape[0]

    def unit_scores(self, scores, reduce):
        return _reduce(scores, (1, 2), reduce)

    def expand(self, keep_units, oik_shape):
        return keep_units.reshape(-1, 1, 1).expand(oik_shape)


class InChannel(Granularity):
    name = "in_channel"

    def num_units(self, oik_shape):
        return oik_shape[1]

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

    selects_within_groups = True

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    @property
    def fixed_sparsity(self) -> float:
        return self.sparsity

    def keep_within_groups(self, scores_oik, sparsity):
        """Prune ⌊sparsity·m⌋ weights of every group (at most m − n): a gradual schedule passes
        through m−1, m−2, … kept weights per group down to n."""
        prune_per_group = min(int(math.floor(sparsity * self.m + 1e-9)), self.m - self.n)
        return self.group_keep(scores_oik, prune_per_group)

    # A unit is one weight (chosen within its group), as for Weight: unit sparsity equals weight sparsity.
    num_units = Weight.num_units
    unit_scores = Weight.unit_scores
    expand = Weight.expand

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


def register_granularity(name: str, cls: type[Granularity]) -> type[Granularity]:
    """Register a :class:`Granularity` subclass (constructible without arguments) as ``granularity="name"``."""
    if not (isinstance(cls, type) and issubclass(cls, Granularity)):
        raise TypeError(f"register_granularity takes a pk.Granularity subclass, got {cls!r}")
    GRANULARITIES[name] = cls
    return cls


def granularity_spec(granularity: Granularity) -> str | dict:
    """The plain description of a granularity that :func:`get_granularity` reads back: a registered
    name, ``"n:m"`` for N:M, ``{"block": [h, w]}`` for blocks."""
    if isinstance(granularity, NM):
        return f"{granularity.n}:{granularity.m}"
    if isinstance(granularity, Block):
        return {"block": [granularity.height, granularity.width]}
    if GRANULARITIES.get(granularity.name) is type(granularity):
        return granularity.name
    raise ValueError(
        f"granularity {granularity.name!r} is not registered, so it cannot be described by name; "
        "register it with pk.register_granularity"
    )


def get_granularity(spec: str | dict | Granularity) -> Granularity:
    """Turn a granularity name (``"weight"``, ..., or ``"2:4"`` for N:M), a dict (``{"block": [h, w]}``,
    ``{"nm": [n, m]}``) or an instance into a :class:`Granularity`."""
    if isinstance(spec, Granularity):
        return spec
    if isinstance(spec, dict) and len(spec) == 1:
        ((kind, sizes),) = spec.items()
        if kind in ("block", "nm") and isinstance(sizes, (list, tuple)) and len(sizes) == 2:
            return Block(*sizes) if kind == "block" else NM(*sizes)
        raise ValueError(f"a granularity given as a dict is {{'block': [h, w]}} or {{'nm': [n, m]}}, got {spec!r}")
    if isinstance(spec, str):
        cls = GRANULARITIES.get(spec)
        if cls is not None:
            return cls()
        n, colon, m = spec.partition(":")
        if colon and n.strip().isdigit() and m.strip().isdigit():
            return NM(int(n), int(m))
        valid = ", ".join(repr(name) for name in GRANULARITIES)
        raise ValueError(
            f"unknown granularity {spec!r}; valid names are {valid}, 'N:M' such as '2:4', or pass pk.Block(h, w) "
            "or pk.NM(n, m)"
        )
    raise TypeError(f"granularity must be a name or a prunekit granularity such as pk.NM(2, 4), got {spec!r}")


def final_sparsity(sparsity: object, granularity: Granularity) -> float:
    """The sparsity to prune to: ``sparsity`` checked (a fraction of units in [0, 1)), or the one a
    granularity such as N:M fixes, which ``sparsity`` may then only repeat."""
    fixed = granularity.fixed_sparsity
    if fixed is None:
        if sparsity is None:
            raise TypeError("sparsity is required: the fraction of units to prune, e.g. sparsity=0.9")
        return check_sparsity(sparsity)
    if sparsity is not None:
        value = check_sparsity(sparsity)
        if abs(value - fixed) > 1e-9:
            raise ValueError(
                f"{granularity.name} fixes the sparsity at {fixed:g}; leave sparsity out or set it to {fixed:g}, "
                f"got {sparsity}"
            )
    return fixed
