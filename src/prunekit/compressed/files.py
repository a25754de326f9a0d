"""Saving and loading compressed files (``pk.save_pruned(..., sparse=True)``) and reading their report."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..plans import PLAN_FORMAT
from .entropy import decode_stream, default_codec
from .format import FORMAT_VERSION, CompressedFileError, blob_bytes, read_container, write_container
from .loading import load_into
from .report import FileReport, TensorReport
from .sharing import CODEBOOK_DTYPES, INITS, resolve_bits, share_tensor
from .tensors import Encoded, decode_tensor, encode_tensor

CODECS = ("zstd", "zlib")


def _check_options(init: str, codebook_dtype: str, codec: str | None) -> str:
    if init not in INITS:
        raise ValueError(f"unknown k-means initialisation {init!r}; use one of {', '.join(map(repr, INITS))}")
    if codebook_dtype not in CODEBOOK_DTYPES:
        raise ValueError(
            f"codebook_dtype must be one of {', '.join(map(repr, CODEBOOK_DTYPES))}, got {codebook_dtype!r}"
        )
    if codec is None:
        return default_codec()
    if codec not in CODECS:
        raise ValueError(
            f"codec must be one of {', '.join(map(repr, CODECS))} (or None: zstd when installed), got {codec!r}"
        )
    if codec == "zstd":
        from .entropy import require_zstandard

        require_zstandard()
    return codec


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict (detached, on the CPU) and ``alias -> first name`` for tensors saved under two keys."""
    state, aliases, seen = {}, {}, {}
    for key, value in model.state_dict().items():
        if value.device.type == "meta":
            raise ValueError(f"{key!r} is on the meta device and holds no values; load real weights before saving")
        if value.is_quantized or value.is_sparse or value.layout != torch.strided:
            raise ValueError(
                f"{key!r} is a quantized or sparse-layout tensor; save_pruned(sparse=True) stores dense-layout tensors"
            )
        identity = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride(), value.device)
        if value.numel() and identity in seen:
            aliases[key] = seen[identity]
        else:
            seen[identity] = key
        state[key] = value.detach()
    return state, aliases


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    weight_bits: int | Mapping[str, int | None] | None = None,
    *,
    init: str = "linear",
    codebook_dtype: str = "float32",
    codec: str | None = None,
    seed: int = 0,
) -> FileReport:
    """Write ``model``'s state dict (and compaction plan) as a compressed file; see :func:`prunekit.save_pruned`."""
    codec = _check_options(init, codebook_dtype, codec)
    bits = resolve_bits(model, weight_bits) if weight_bits is not None else {}
    state, aliases = _state(model)
    entries, blobs, descriptors, reports = [], [], [], []

    def add_blob(symbols: np.ndarray, symbol_bits: int, coder: str, blob: bytes) -> int:
        descriptors.append(
            {"coder": coder, "count": int(symbols.size), "bits": symbol_bits, "dtype": symbols.dtype.str}
        )
        blobs.append(blob)
        return len(blobs) - 1

    for key, tensor in state.items():
        entry: dict[str, Any] = {
            "name": key,
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
        }
        if key in aliases:
            entry["alias"] = aliases[key]
            entries.append(entry)
            reports.append(TensorReport(key, tuple(tensor.shape), entry["dtype"], 0, f"alias of {aliases[key]}", "—"))
            continue
        shared = None
        if key in bits:
            shared = share_tensor(tensor.cpu(), bits[key], init, codebook_dtype, seed, key)
        encoded = encode_tensor(tensor, shared, codec)
        start = len(blobs)
        entry.update(form=encoded.layout.form, params=encoded.layout.params, nonzero=encoded.extra["nonzero"])
        entry["positions"] = [add_blob(*s) for s in encoded.streams["positions"]]
        after_positions = len(blobs)
        values = [add_blob(*s) for s in encoded.streams["values"]]
        if shared is not None:
            entry["values"] = {"kind": "shared", "bits": bits[key], "codebook_dtype": codebook_dtype,
                               "codebook_size": encoded.extra["codebook_size"], "codes": values[0],
                               "codebook": add_blob(*encoded.streams["codebook"][0])}  # fmt: skip
        else:
            entry["values"] = {"kind": "raw", "planes": values}
        entries.append(entry)
        reports.append(_tensor_report(entry, encoded, [len(b) for b in blobs[start:]], after_positions - start,
                                      [d["coder"] for d in descriptors[start:]]))  # fmt: skip
    plan = getattr(model, "prunekit_plan", None)
    metadata = getattr(model.state_dict(), "_metadata", None) or {}
    header = {"codec": codec, "plan": plan, "state_metadata": {k: dict(v) for k, v in metadata.items()},
              "tensors": entries, "blobs": descriptors}  # fmt: skip
    size = write_container(path, header, blobs)
    return FileReport(
        os.fspath(path), FORMAT_VERSION, codec, size, size - sum(map(len, blobs)), plan is not None, reports
    )


def _form_name(form: str, params: dict) -> str:
    if form == "relative":
        return f"relative({params['bits']})"
    if form == "nm":
        return f"nm({params['n']}:{params['m']})"
    return form


def _values_name(entry: dict) -> str:
    values = entry["values"]
    if values["kind"] == "shared":
        return f"shared {values['bits']}-bit ({values['codebook_dtype']} codebook)"
    return f"raw {entry['dtype']}"


def _tensor_report(
    entry: dict, encoded: Encoded | None, sizes: list[int], positions: int, coders: list[str]
) -> TensorReport:
    codebook = sizes[-1] if entry["values"]["kind"] == "shared" else 0
    values = sum(sizes[positions:]) - codebook
    return TensorReport(entry["name"], tuple(entry["shape"]), entry["dtype"], entry["nonzero"],
                        _form_name(entry["form"], entry.get("params", {})), _values_name(entry),
                        sum(sizes[:positions]), values, codebook, tuple(coders))  # fmt: skip


def _decode_blob(header, payload, offsets, index: int, what: str) -> np.ndarray:
    descriptor = header["blobs"][index]
    blob = blob_bytes(header, payload, offsets, index, what)
    try:
        return decode_stream(
            descriptor["coder"], blob, descriptor["count"], descriptor["bits"], np.dtype(descriptor["dtype"])
        )
    except ImportError:
        raise
    except Exception as error:
        raise CompressedFileError(f"the data of {what} does not decode ({error})") from error


def read_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(header, state dict)`` of a compressed file, every tensor decoded and checked."""
    header, payload, offsets = read_container(path)
    state: dict[str, torch.Tensor] = {}
    for entry in header["tensors"]:
        name = entry["name"]
        if "alias" in entry:
            state[name] = state[entry["alias"]]
            continue
        streams = {
            "positions": [
                _decode_blob(header, payload, offsets, i, f"{name!r} (positions)") for i in entry["positions"]
            ]
        }
        values = entry["values"]
        codebook = None
        if values["kind"] == "shared":
            streams["values"] = [_decode_blob(header, payload, offsets, values["codes"], f"{name!r} (codes)")]
            raw = _decode_blob(header, payload, offsets, values["codebook"], f"{name!r} (codebook)")
            codebook = torch.from_numpy(raw.copy()).view(CODEBOOK_DTYPES[values["codebook_dtype"]])
        else:
            streams["values"] = [
                _decode_blob(header, payload, offsets, i, f"{name!r} (values)") for i in values["planes"]
            ]
        try:
            state[name] = decode_tensor(entry, streams, codebook)
        except ValueError as error:
            raise CompressedFileError(f"{name!r} in {os.fspath(path)!r} does not decode: {error}") from error
    return header, state


def load_compressed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a compressed file into ``model`` (a fresh instance of the saved model's class); see
    :func:`prunekit.load_pruned`. Every check runs before the model changes."""
    header, state = read_state(path)
    plan = header.get("plan") or {"format": PLAN_FORMAT, "kept": {}}
    return load_into(model, plan, state, header.get("state_metadata"))


def inspect_file(path: str | os.PathLike) -> FileReport:
    """What a file written by ``pk.save_pruned(..., sparse=True)`` holds: bytes per tensor (positions,
    values, codebook), its index form and coders, the header's size, and bytes per form. Checks the
    file's checksum; decodes nothing."""
    header, payload, _ = read_container(path)
    lengths = [d["length"] for d in header["blobs"]]
    reports = []
    for entry in header["tensors"]:
        if "alias" in entry:
            reports.append(
                TensorReport(entry["name"], tuple(entry["shape"]), entry["dtype"], 0, f"alias of {entry['alias']}", "—")
            )
            continue
        values = entry["values"]
        ids = entry["positions"] + (
            [values["codes"], values["codebook"]] if values["kind"] == "shared" else values["planes"]
        )
        reports.append(_tensor_report(entry, None, [lengths[i] for i in ids], len(entry["positions"]),
                                      [header["blobs"][i]["coder"] for i in ids]))  # fmt: skip
    size = os.path.getsize(path)
    return FileReport(
        os.fspath(path),
        header["version"],
        header["codec"],
        size,
        size - len(payload),
        bool(header.get("plan")),
        reports,
    )
