"""Entropy coding of the symbol streams of a compressed file: bit-packing, zstandard, zlib, Huffman.

A *stream* is a 1-D numpy array of unsigned symbols (``uint8`` or ``uint16``) of a known width in bits
(``symbol_bits``): relative-index gaps, N:M positions, bitmask bytes, shared-weight indices or the
bytes of raw values. Each stream is written with the coder that makes it smallest:

- ``"packed"``: every symbol in ``symbol_bits`` bits, no entropy coding (the fixed-width baseline of
  Deep Compression, Han et al. 2016, §3: e.g. 5-bit indices);
- ``"zstd"``: zstandard (``pip install "prunekit[compress]"``) of the symbols' bytes;
- ``"zlib"``: the standard library's deflate, used where zstandard is not installed;
- ``"huffman"``: a canonical Huffman code over the symbols (Han et al. 2016, §4: shared-weight
  indices and sparse-matrix indices are biased, so variable-length codes save 20–30%). Offered for
  streams of at most :data:`HUFFMAN_MAX_SYMBOLS` symbols, because its decoder is a Python loop.

Blob layouts (all integers little-endian):

- packed: the symbols' bits, most significant bit first, padded with zeros to whole bytes;
- huffman: ``u16 A`` (alphabet size), ``A`` bytes of code lengths (0 = symbol unused), then the code
  bits, most significant bit first, padded with zeros; codes are canonical (shorter codes first, then
  by symbol), so the lengths define them;
- zstd / zlib: the compressed bytes of the symbols (``uint16`` symbols little-endian).

The symbol count is not in the blob: the file header records it.
"""

from __future__ import annotations

import heapq
import zlib

import numpy as np

CODERS = ("packed", "zstd", "zlib", "huffman")
#: Huffman is tried on streams up to this many symbols (its decoder is a Python loop, ~0.1 s per 10⁶).
HUFFMAN_MAX_SYMBOLS = 1 << 22
#: Longest Huffman code allowed; a stream that needs longer codes is left to the other coders.
HUFFMAN_MAX_LENGTH = 24


def zstandard_available() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def default_codec() -> str:
    """``"zstd"`` when zstandard is installed, else ``"zlib"``."""
    return "zstd" if zstandard_available() else "zlib"


def require_zstandard():
    try:
        import zstandard
    except ImportError as error:
        raise ImportError(
            'this needs the zstandard package: pip install "prunekit[compress]" (or pip install zstandard); '
            'or save with codec="zlib"'
        ) from error
    return zstandard


def _symbol_bytes(symbols: np.ndarray) -> bytes:
    return symbols.astype(symbols.dtype.newbyteorder("<"), copy=False).tobytes()


def pack_bits(symbols: np.ndarray, bits: int) -> bytes:
    """Each symbol in ``bits`` bits, most significant first, zero-padded to whole bytes."""
    if bits == 8 and symbols.dtype == np.uint8:
        return symbols.tobytes()
    values = symbols.astype(np.uint32, copy=False)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    planes = ((values[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1)).tobytes()


def unpack_bits(blob: bytes, bits: int, count: int, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`pack_bits`."""
    if bits == 8 and dtype == np.uint8:
        return np.frombuffer(blob, dtype=np.uint8, count=count).copy()
    flat = np.unpackbits(np.frombuffer(blob, dtype=np.uint8))[: count * bits]
    if flat.size != count * bits:
        raise ValueError(f"packed stream holds {flat.size} bits, {count * bits} expected")
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.uint32)).astype(np.uint32)
    return (flat.reshape(count, bits).astype(np.uint32) @ weights).astype(dtype)


# ---------------------------------------------------------------------------------------- Huffman


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length per symbol of a Huffman code for ``counts`` (0 for unused symbols; a lone used symbol
    gets length 1). Ties are broken by symbol so the code is deterministic."""
    used = [int(s) for s in np.nonzero(counts)[0]]
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    heap = [(int(counts[s]), s, (s,)) for s in used]
    heapq.heapify(heap)
    order = len(counts)
    while len(heap) > 1:
        count_a, _, symbols_a = heapq.heappop(heap)
        count_b, _, symbols_b = heapq.heappop(heap)
        for s in symbols_a + symbols_b:
            lengths[s] += 1
        heapq.heappush(heap, (count_a + count_b, order, symbols_a + symbols_b))
        order += 1
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code (as an integer of ``lengths[s]`` bits) per symbol: symbols sorted by (length, symbol)
    get consecutive codes, shifted left whenever the length grows."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, previous = 0, 0
    for symbol in sorted((s for s in range(len(lengths)) if lengths[s]), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        previous = int(lengths[symbol])
        code += 1
    return codes


def huffman_encode(symbols: np.ndarray, alphabet: int) -> bytes | None:
    """The Huffman blob of ``symbols`` (values < ``alphabet``), or None when a code would be longer
    than :data:`HUFFMAN_MAX_LENGTH` bits."""
    counts = np.bincount(symbols, minlength=alphabet)
    lengths = huffman_lengths(counts)
    if symbols.size and lengths.max() > HUFFMAN_MAX_LENGTH:
        return None
    codes = canonical_codes(lengths)
    element_lengths = lengths[symbols]
    element_codes = codes[symbols]
    starts = np.cumsum(element_lengths) - element_lengths
    bits = np.zeros(int(element_lengths.sum()), dtype=np.uint8)
    for j in range(int(lengths.max()) if symbols.size else 0):
        has = element_lengths > j
        bits[starts[has] + j] = (element_codes[has] >> (element_lengths[has] - 1 - j)) & 1
    head = np.array([alphabet], dtype="<u2").tobytes() + lengths.astype(np.uint8).tobytes()
    return head + np.packbits(bits).tobytes()


def huffman_decode(blob: bytes, count: int, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`huffman_encode`, for ``count`` symbols."""
    if len(blob) < 2:
        raise ValueError("Huffman stream shorter than its header")
    alphabet = int(np.frombuffer(blob[:2], dtype="<u2")[0])
    if len(blob) < 2 + alphabet:
        raise ValueError("Huffman stream shorter than its code-length table")
    lengths = np.frombuffer(blob[2 : 2 + alphabet], dtype=np.uint8).astype(np.int64)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    longest = int(lengths.max())
    if not 0 < longest <= HUFFMAN_MAX_LENGTH:
        raise ValueError("Huffman code lengths out of range")
    codes = canonical_codes(lengths)
    # table[w] for every ``longest``-bit window w: the symbol whose code starts it, and that code's length.
    table_symbol = np.full(1 << longest, -1, dtype=np.int64)
    table_length = np.zeros(1 << longest, dtype=np.int64)
    for symbol in np.nonzero(lengths)[0]:
        span = 1 << (longest - int(lengths[symbol]))
        start = int(codes[symbol]) << (longest - int(lengths[symbol]))
        table_symbol[start : start + span] = symbol
        table_length[start : start + span] = lengths[symbol]
    bits = np.unpackbits(np.frombuffer(blob[2 + alphabet :], dtype=np.uint8))
    padded = np.concatenate([bits, np.zeros(longest, dtype=np.uint8)]).astype(np.int64)
    windows = np.zeros(bits.size, dtype=np.int64)
    for j in range(longest):
        windows = (windows << 1) | padded[j : j + bits.size]
    symbols_at = table_symbol[windows].tolist()
    lengths_at = table_length[windows].tolist()
    out = [0] * count
    position, limit = 0, bits.size
    for i in range(count):
        if position >= limit or symbols_at[position] < 0:
            raise ValueError("Huffman stream ends early or holds an invalid code")
        out[i] = symbols_at[position]
        position += lengths_at[position]
    if position > limit:
        raise ValueError("Huffman stream ends early")
    return np.asarray(out, dtype=dtype)


# ------------------------------------------------------------------------------ choosing a coder


def _zstd_level(size: int) -> int:
    # Level 19 costs ~0.2 s per 200 KB and gains < 1% over level 12 on these streams (LeNet-300-100).
    return 19 if size <= 1 << 16 else 12 if size <= 1 << 20 else 6


def encode_stream(symbols: np.ndarray, symbol_bits: int, codec: str) -> tuple[str, bytes]:
    """``(coder, blob)``: the smallest of bit-packing, ``codec`` (``"zstd"`` or ``"zlib"``) and Huffman."""
    symbols = np.ascontiguousarray(symbols)
    candidates = [("packed", pack_bits(symbols, symbol_bits))]
    raw = _symbol_bytes(symbols)
    if codec == "zstd":
        zstandard = require_zstandard()
        candidates.append(("zstd", zstandard.ZstdCompressor(level=_zstd_level(len(raw))).compress(raw)))
    elif codec == "zlib":
        candidates.append(("zlib", zlib.compress(raw, 9)))
    else:
        raise ValueError(f"unknown codec {codec!r}; use 'zstd' or 'zlib'")
    if 0 < symbols.size <= HUFFMAN_MAX_SYMBOLS:
        blob = huffman_encode(symbols, 1 << symbol_bits)
        if blob is not None:
            candidates.append(("huffman", blob))
    return min(candidates, key=lambda c: len(c[1]))


def decode_stream(coder: str, blob: bytes, count: int, symbol_bits: int, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`encode_stream`: ``count`` symbols of ``dtype``."""
    dtype = np.dtype(dtype)
    if coder == "packed":
        return unpack_bits(blob, symbol_bits, count, dtype)
    if coder == "huffman":
        return huffman_decode(blob, count, dtype)
    if coder == "zstd":
        raw = require_zstandard().ZstdDecompressor().decompress(blob, max_output_size=count * dtype.itemsize)
    elif coder == "zlib":
        raw = zlib.decompress(blob)
    else:
        raise ValueError(f"unknown coder {coder!r}")
    if len(raw) != count * dtype.itemsize:
        raise ValueError(f"stream decodes to {len(raw)} bytes, {count * dtype.itemsize} expected")
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)


def estimate_bytes(symbols: np.ndarray, symbol_bits: int) -> float:
    """Bytes a stream will take, about: the smaller of its packed size and a Huffman code's size
    (each symbol −log2 p bits, but at least 1)."""
    if symbols.size == 0:
        return 0.0
    packed = symbols.size * symbol_bits / 8
    counts = np.bincount(symbols.astype(np.int64, copy=False))
    counts = counts[counts > 0]
    bits = np.maximum(1.0, -np.log2(counts / symbols.size))
    return min(packed, float((counts * bits).sum()) / 8 + len(counts))
