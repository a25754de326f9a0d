"""Index forms: which elements of a tensor a compressed file stores, and how their positions are written.

Every form lists the *stored entries* of a tensor (flat, C-order positions) and writes their positions
in one or more symbol streams; the entries' values follow in that order (raw bit patterns, or shared
weight indices: :mod:`prunekit.compressed.sharing`). Elements not stored are zero.

- ``dense``: every element, no positions (compacted and unpruned tensors).
- ``bitmask``: one bit per element (1 = stored, most significant bit first), then the non-zeros.
- ``relative``: Deep Compression's relative indices (Han et al. 2016, §2): for each non-zero, the
  number of zeros since the previous one, in ``bits`` bits. A gap that does not fit is split by
  *filler* symbols: the symbol G = 2^bits − 1 means "advance G positions, nothing stored"; a real
  non-zero's symbol r ∈ [0, G) means "skip r zeros, then store one". A gap of d zeros takes
  ⌊d / G⌋ fillers and one symbol d mod G. (The paper stores a filler as an explicit zero value; a
  value-less filler saves that value.)
- ``rows``: a bit per row of dimension 0 (structured pruning, not yet compacted), then every element
  of the kept rows.
- ``nm``: N:M sparsity along the input dimension (:class:`prunekit.NM`'s layout: the tensor viewed as
  (O, I, K), groups of m consecutive input indices at each output and kernel position): per group the
  n stored positions in log2(m) bits each (2:4: 2 bits per kept weight), groups in (o, i/m, k) order.
  A group with fewer than n non-zeros stores some zeros.

:func:`layouts` proposes every form that fits a tensor; the caller keeps the one whose streams are
estimated smallest after entropy coding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RELATIVE_BITS = (3, 4, 5, 6, 8)
NM_GROUPS = (2, 4, 8, 16)
FORMS = ("dense", "bitmask", "relative", "rows", "nm")


@dataclass
class Layout:
    """One way to store a tensor: ``form`` and its ``params``, the position streams (symbols, bits) and
    ``take``, the flat positions of the stored entries in storage order."""

    form: str
    params: dict = field(default_factory=dict)
    positions: list[tuple[np.ndarray, int]] = field(default_factory=list)
    take: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def oik_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(outputs, inputs, kernel elements) of a weight: dims 0, 1 and the product of the rest."""
    kernel = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    return shape[0], shape[1], kernel


def layouts(nonzero: np.ndarray, shape: tuple[int, ...]) -> list[Layout]:
    """Every form that can store a tensor whose flat non-zero pattern is ``nonzero`` (bool)."""
    numel = nonzero.size
    where = np.flatnonzero(nonzero)
    result = [Layout("dense", take=np.arange(numel, dtype=np.int64))]
    if numel == 0:
        return result
    result.append(Layout("bitmask", positions=[(np.packbits(nonzero), 8)], take=where))
    for bits in RELATIVE_BITS:
        result.append(Layout("relative", {"bits": bits}, [(relative_symbols(where, bits), bits)], where))
    if len(shape) >= 2 and shape[0] > 0:
        rows = nonzero.reshape(shape[0], -1).any(axis=1)
        if not rows.all():
            row_size = numel // shape[0]
            take = (np.flatnonzero(rows)[:, None] * row_size + np.arange(row_size)).reshape(-1)
            result.append(Layout("rows", positions=[(np.packbits(rows), 8)], take=take))
        result.extend(nm_layouts(nonzero, shape))
    return result


def relative_symbols(where: np.ndarray, bits: int) -> np.ndarray:
    """Relative-index symbols of sorted positions ``where`` (see the module docstring)."""
    filler = (1 << bits) - 1
    gaps = np.diff(where, prepend=-1) - 1
    fillers, remainder = np.divmod(gaps, filler)
    counts = fillers + 1
    symbols = np.full(int(counts.sum()), filler, dtype=np.uint8)
    symbols[np.cumsum(counts) - 1] = remainder
    return symbols


def relative_positions(symbols: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`relative_symbols`: the positions of the stored entries."""
    filler = (1 << bits) - 1
    steps = symbols.astype(np.int64) + (symbols != filler)
    ends = np.cumsum(steps) - 1
    return ends[symbols != filler]


def nm_layouts(nonzero: np.ndarray, shape: tuple[int, ...]) -> list[Layout]:
    out_dim, in_dim, kernel = oik_shape(shape)
    result = []
    for m in NM_GROUPS:
        if in_dim % m:
            continue
        groups = nonzero.reshape(out_dim, in_dim // m, m, kernel).transpose(0, 1, 3, 2)
        counts = groups.sum(axis=-1)
        n = int(counts.max(initial=0))
        # Only patterns that are N:M (most groups hold exactly n): elsewhere the form never pays.
        if not 0 < n < m or (counts == n).mean() < 0.5:
            continue
        slots = np.arange(m)
        # Non-zeros first (in position order), then the zeros that fill a group up to n.
        order = np.argsort(np.where(groups, slots, m + slots), axis=-1, kind="stable")[..., :n]
        chosen = np.sort(order, axis=-1)
        result.append(Layout("nm", {"n": n, "m": m}, [(chosen.reshape(-1).astype(np.uint8), m.bit_length() - 1)],
                             nm_take(chosen, shape, m)))  # fmt: skip
    return result


def nm_take(chosen: np.ndarray, shape: tuple[int, ...], m: int) -> np.ndarray:
    """Flat positions of N:M entries: ``chosen`` (O, I/m, K, n) holds each group's slots."""
    out_dim, in_dim, kernel = oik_shape(shape)
    o = np.arange(out_dim, dtype=np.int64)[:, None, None, None]
    g = np.arange(in_dim // m, dtype=np.int64)[None, :, None, None]
    k = np.arange(kernel, dtype=np.int64)[None, None, :, None]
    return (o * in_dim * kernel + (g * m + chosen.astype(np.int64)) * kernel + k).reshape(-1)


def decode_positions(form: str, params: dict, shape: tuple[int, ...], streams: list[np.ndarray]) -> np.ndarray:
    """Flat positions of the stored entries, from the decoded position streams (validated: in range,
    increasing where the form says so)."""
    numel = int(np.prod(shape, dtype=np.int64))
    if form == "dense":
        return np.arange(numel, dtype=np.int64)
    if form == "bitmask":
        return np.flatnonzero(np.unpackbits(streams[0], count=numel))
    if form == "rows":
        rows = np.unpackbits(streams[0], count=shape[0]).astype(bool)
        row_size = numel // shape[0] if shape[0] else 0
        return (np.flatnonzero(rows)[:, None] * row_size + np.arange(row_size)).reshape(-1)
    if form == "relative":
        positions = relative_positions(streams[0], int(params["bits"]))
        if positions.size and positions[-1] >= numel:
            raise ValueError("relative indices run past the end of the tensor")
        return positions
    if form == "nm":
        m, n = int(params["m"]), int(params["n"])
        out_dim, in_dim, kernel = oik_shape(shape)
        chosen = streams[0].reshape(out_dim, in_dim // m, kernel, n)
        if chosen.size and (chosen.max() >= m or (n > 1 and (np.diff(chosen, axis=-1) <= 0).any())):
            raise ValueError("N:M positions out of range or not increasing")
        return nm_take(chosen, shape, m)
    raise ValueError(f"unknown index form {form!r}")
