"""One tensor to streams and back: choose its index form, write its values raw or shared.

A tensor's *stored entries* (:mod:`prunekit.compressed.encode`) are written either as their exact bit
patterns, split into byte planes (the exponent bytes of floats compress far better on their own), or,
with weight sharing, as one code per entry into a codebook (:mod:`prunekit.compressed.sharing`).
The form chosen is the one whose streams :func:`~prunekit.compressed.entropy.estimate_bytes` says are
smallest after entropy coding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .encode import Layout, decode_positions, layouts
from .entropy import encode_stream, estimate_bytes
from .sharing import SharedTensor

_UINT = {
    1: (torch.uint8, np.uint8),
    2: (torch.int16, np.uint16),
    4: (torch.int32, np.uint32),
    8: (torch.int64, np.uint64),
}


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def bit_patterns(tensor: torch.Tensor) -> np.ndarray:
    """The flat C-order bit patterns of ``tensor`` as unsigned integers of its element size."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    torch_uint, numpy_uint = _UINT[flat.element_size()]
    return flat.view(torch_uint).numpy().view(numpy_uint)


def _signed(numpy_uint) -> type:
    return {np.uint8: np.uint8, np.uint16: np.int16, np.uint32: np.int32, np.uint64: np.int64}[numpy_uint]


def byte_planes(patterns: np.ndarray) -> list[np.ndarray]:
    """Byte j (little-endian) of every pattern, for each j."""
    as_bytes = patterns.astype(patterns.dtype.newbyteorder("<"), copy=False).view(np.uint8)
    return [np.ascontiguousarray(p) for p in as_bytes.reshape(patterns.size, patterns.dtype.itemsize).T]


def join_planes(planes: list[np.ndarray], numpy_uint) -> np.ndarray:
    stacked = np.ascontiguousarray(np.stack(planes, axis=1)) if planes else np.zeros((0, 1), dtype=np.uint8)
    return stacked.view(np.dtype(numpy_uint).newbyteorder("<")).reshape(-1).astype(numpy_uint)


@dataclass
class Encoded:
    """A tensor ready to write: its layout and coded streams ``(symbols, bits, coder, blob)`` by role
    (``"positions"``, ``"values"``, ``"codebook"``)."""

    layout: Layout
    value_kind: str
    streams: dict[str, list[tuple[np.ndarray, int, str, bytes]]]
    extra: dict


#: How many of the forms estimated smallest are coded to pick the one that really is.
CODED_CANDIDATES = 3


def code_stream(codes: np.ndarray, codebook_size: int) -> tuple[np.ndarray, int]:
    """Codes as a stream: bits for ``codebook_size`` centroids, plus one symbol for zeros where present."""
    alphabet = codebook_size + 1 if codes.size and codes.max() == codebook_size else codebook_size
    bits = max(1, (alphabet - 1).bit_length())
    return codes.astype(np.uint8 if bits <= 8 else np.uint16), bits


def encode_tensor(tensor: torch.Tensor, shared: SharedTensor | None, codec: str) -> Encoded:
    """Choose the form of ``tensor`` (already weight-shared as ``shared``, or raw) and code its streams
    with ``codec``: of the :data:`CODED_CANDIDATES` forms estimated smallest, the one whose coded
    streams really are smallest."""
    shape = tuple(tensor.shape)
    if shared is not None:
        nonzero = shared.codes != shared.codebook.numel()
    else:
        patterns = bit_patterns(tensor)
        nonzero = patterns != 0
        if tensor.is_floating_point():
            # −0.0 == 0.0 (masking a negative weight makes one): a zero, whatever its sign.
            sign = np.array(1 << (8 * patterns.dtype.itemsize - 1), dtype=patterns.dtype)
            nonzero &= patterns != sign

    def value_streams(take: np.ndarray) -> list[tuple[np.ndarray, int]]:
        if shared is not None:
            return [code_stream(shared.codes[take], shared.codebook.numel())]
        return [(plane, 8) for plane in byte_planes(patterns[take])]

    def code(streams):
        return [(symbols, bits, *encode_stream(symbols, bits, codec)) for symbols, bits in streams]

    candidates = sorted(
        layouts(nonzero, shape), key=lambda c: sum(estimate_bytes(*s) for s in c.positions + value_streams(c.take))
    )
    options = [
        (c, {"positions": code(c.positions), "values": code(value_streams(c.take))})
        for c in candidates[:CODED_CANDIDATES]
    ]
    best, coded = min(options, key=lambda o: sum(len(s[3]) for streams in o[1].values() for s in streams))
    extra = {"nonzero": int(nonzero.sum())}
    if shared is not None:
        coded["codebook"] = code([(shared.codebook.contiguous().view(torch.uint8).numpy(), 8)])
        extra["codebook_size"] = shared.codebook.numel()
    return Encoded(best, "shared" if shared is not None else "raw", coded, extra)


def decode_tensor(entry: dict, streams: dict[str, list[np.ndarray]], codebook: torch.Tensor | None) -> torch.Tensor:
    """Rebuild a tensor from its header ``entry`` and decoded streams (validated against each other)."""
    dtype = dtype_from_name(entry["dtype"])
    shape = tuple(int(s) for s in entry["shape"])
    numel = int(np.prod(shape, dtype=np.int64))
    positions = decode_positions(entry["form"], entry.get("params", {}), shape, streams["positions"])
    values = entry["values"]
    if values["kind"] == "shared":
        codes = streams["values"][0].astype(np.int64)
        if codes.size != positions.size or (codes.size and codes.max() > codebook.numel()):
            raise ValueError("the shared-weight codes do not match the index positions")
        table = torch.cat([codebook.to(dtype), torch.zeros(1, dtype=dtype)])
        out = torch.zeros(numel, dtype=dtype)
        out[torch.from_numpy(positions)] = table[torch.from_numpy(codes)]
        return out.reshape(shape)
    element = torch.empty(0, dtype=dtype).element_size() if dtype != torch.bool else 1
    numpy_uint = _UINT[element][1]
    entries = join_planes(streams["values"], numpy_uint)
    if entries.size != positions.size:
        raise ValueError(f"{entries.size} values for {positions.size} index positions")
    patterns = np.zeros(numel, dtype=numpy_uint)
    patterns[positions] = entries
    torch_uint = _UINT[element][0]
    flat = torch.from_numpy(patterns.view(_signed(numpy_uint))).view(torch_uint)
    return (flat.view(torch.bool) if dtype == torch.bool else flat.view(dtype)).reshape(shape).clone()
