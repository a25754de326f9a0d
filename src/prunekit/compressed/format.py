"""The container of a compressed prunekit file: a versioned header and checksummed blobs, no pickle.

Layout (integers little-endian)::

    offset 0   8 bytes   magic  b"PRUNEKIT"
    offset 8   u16       format version (FORMAT_VERSION; a reader refuses any other)
    offset 10  u32       H, the length of the compressed header
    offset 14  H bytes   header: zlib-compressed UTF-8 JSON (below)
    ...        P bytes   payload: the blobs, back to back, in the order of header["blobs"]
    last 32    sha256 of every byte before it

The header JSON holds ``format`` ("prunekit-compressed"), ``version``, ``payload_length`` (P),
``codec`` ("zstd" or "zlib"), ``plan`` (the compaction plan of :func:`prunekit.compact`, or null),
``state_metadata`` (the state dict's per-module version numbers), ``blobs`` (per blob: ``length`` in
bytes, ``crc32``, ``coder``, symbol ``count``, symbol ``bits`` and numpy ``dtype``, see
:mod:`prunekit.compressed.entropy`) and ``tensors``, one entry per state-dict key, in order:

- ``name``, ``dtype`` (torch dtype name, e.g. "float32"), ``shape``, ``nonzero`` (count);
- ``alias``: the name of an earlier entry holding the same tensor (tied weights), and nothing else; or
- ``form`` and ``params``, the index form (:mod:`prunekit.compressed.encode`), and ``positions``, the
  blob numbers of its position streams;
- ``values``: ``{"kind": "raw", "planes": [blob, ...]}``: the stored entries' bit patterns split into
  byte planes (plane j holds byte j, little-endian, of every entry), or ``{"kind": "shared", "bits",
  "codebook": blob, "codebook_dtype", "codebook_size": K, "codes": blob}``: weight sharing, one code
  per entry (K = a zero), the codebook holding K centroids in ``codebook_dtype``.

A reader checks, before anything is decoded, the magic, the version, the length and the sha256; then
every blob's crc32 as it is decoded.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import zlib
from typing import Any

MAGIC = b"PRUNEKIT"
FORMAT_VERSION = 1
FORMAT_NAME = "prunekit-compressed"
_PREFIX = struct.Struct("<8sHI")
_DIGEST = 32


class CompressedFileError(ValueError):
    """A compressed prunekit file is not readable: not such a file, another version, corrupt or truncated."""


def is_compressed_file(path: str | os.PathLike) -> bool:
    """True if ``path`` starts with the magic bytes of a compressed prunekit file."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(MAGIC)) == MAGIC
    except (FileNotFoundError, IsADirectoryError, TypeError):  # TypeError: a file object, not a path
        return False


def write_container(path: str | os.PathLike, header: dict[str, Any], blobs: list[bytes]) -> int:
    """Write header and blobs to ``path`` (through a temporary file, so a failed write leaves no half
    file); ``header["blobs"]`` entries get their ``length`` and ``crc32``. Returns the file size in bytes."""
    for descriptor, blob in zip(header["blobs"], blobs, strict=True):
        descriptor["length"] = len(blob)
        descriptor["crc32"] = zlib.crc32(blob)
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "payload_length": sum(map(len, blobs)), **header}
    packed_header = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    digest = hashlib.sha256()
    folder = os.path.dirname(os.path.abspath(path))
    handle = tempfile.NamedTemporaryFile(dir=folder, prefix=".prunekit-", delete=False)
    try:
        with handle:
            for chunk in (_PREFIX.pack(MAGIC, FORMAT_VERSION, len(packed_header)), packed_header, *blobs):
                digest.update(chunk)
                handle.write(chunk)
            handle.write(digest.digest())
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise
    return os.path.getsize(path)


def read_container(path: str | os.PathLike) -> tuple[dict[str, Any], memoryview, list[int]]:
    """``(header, payload, offsets)`` of a compressed file, after checking magic, version, length and
    sha256; raises :class:`CompressedFileError` saying which failed."""
    with open(path, "rb") as handle:
        data = handle.read()
    if len(data) < _PREFIX.size or data[: len(MAGIC)] != MAGIC:
        raise CompressedFileError(f"{os.fspath(path)!r} is not a compressed prunekit file (no PRUNEKIT magic bytes)")
    _, version, header_length = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise CompressedFileError(
            f"{os.fspath(path)!r} has compressed-format version {version}; this prunekit reads version "
            f"{FORMAT_VERSION} only (a newer prunekit wrote it, or the file is corrupt)"
        )
    start = _PREFIX.size + header_length
    if len(data) < start + _DIGEST:
        raise CompressedFileError(
            f"{os.fspath(path)!r} is truncated: {len(data)} bytes, its header alone needs {start + _DIGEST}"
        )
    header = _parse_header(data[_PREFIX.size : start])
    expected = start + (header or {}).get("payload_length", 0) + _DIGEST
    if header is not None and len(data) != expected:
        raise CompressedFileError(
            f"{os.fspath(path)!r} is {'truncated' if len(data) < expected else 'longer than written'}: "
            f"{len(data)} bytes, {expected} expected"
        )
    if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:] or header is None:
        raise CompressedFileError(f"{os.fspath(path)!r} is corrupt: its sha256 checksum does not match its contents")
    if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
        raise CompressedFileError(f"{os.fspath(path)!r}: its header is not a version-{FORMAT_VERSION} prunekit header")
    offsets, position = [], 0
    for descriptor in header["blobs"]:
        offsets.append(position)
        position += descriptor["length"]
    return header, memoryview(data)[start:-_DIGEST], offsets


def _parse_header(raw: bytes) -> dict[str, Any] | None:
    try:
        header = json.loads(zlib.decompress(raw).decode())
    except (zlib.error, UnicodeDecodeError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def blob_bytes(header: dict[str, Any], payload: memoryview, offsets: list[int], index: int, what: str) -> bytes:
    """Blob ``index``, after checking its crc32 (``what`` names it in the error)."""
    descriptor = header["blobs"][index]
    blob = bytes(payload[offsets[index] : offsets[index] + descriptor["length"]])
    if len(blob) != descriptor["length"] or zlib.crc32(blob) != descriptor["crc32"]:
        raise CompressedFileError(f"the data of {what} is corrupt (crc32 mismatch)")
    return blob
