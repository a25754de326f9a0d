"""Saving and loading pruned models without pickling a module: :func:`save_pruned` writes the plan
(:mod:`prunekit.plans`) and the weights — as ``torch.save`` of plain tensors and strings, safetensors,
or prunekit's compressed format (:mod:`prunekit.compressed`) — and :func:`load_pruned` applies the plan
to a fresh instance of the original class, after checking everything, then loads the weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .plans import PLAN_FORMAT


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    sparse: bool = False,
    weight_bits: int | Mapping[str, int | None] | None = None,
    **compressed_options: Any,
):
    """Save a pruned or compacted model as its plan (JSON) and its weights, without pickling the module.

    Without ``sparse``, a path ending in ``.safetensors`` is written with safetensors (``pip install
    safetensors``), the plan in its metadata; any other path with ``torch.save`` of plain tensors and
    strings, which :func:`load_pruned` reads with ``weights_only=True``. Returns None.

    With ``sparse=True`` the file is prunekit's compressed format (:mod:`prunekit.compressed`): each
    tensor as its non-zero values plus the cheapest index form for its pattern, entropy-coded, exact on
    reload; ``weight_bits`` (an int, or a dict per kind ``{"conv": 8, "linear": 5}`` or module-name
    pattern) adds k-means weight sharing (Han et al. 2016). Further options: ``init`` ("linear",
    "density", "random"), ``codebook_dtype`` ("float32", "float16"), ``codec`` ("zstd", "zlib"),
    ``seed``. Returns a :class:`prunekit.compressed.FileReport` (bytes per tensor and per form).
    """
    if sparse:
        if str(path).endswith(".safetensors"):
            raise ValueError(
                "sparse=True writes prunekit's compressed format, not safetensors; use another suffix, e.g. 'model.pk'"
            )
        from .compressed import save_compressed

        return save_compressed(model, path, weight_bits, **compressed_options)
    if weight_bits is not None or compressed_options:
        given = ["weight_bits"] * (weight_bits is not None) + sorted(compressed_options)
        raise ValueError(f"{', '.join(given)} apply to compressed files only; pass sparse=True as well")
    plan = getattr(model, "prunekit_plan", None) or {"format": PLAN_FORMAT, "kept": {}}
    full_state = model.state_dict()
    state = {k: v.detach().contiguous() for k, v in full_state.items()}
    # Some modules check the version their state was saved with (torchvision's MNASNet): keep it.
    plan = {**plan, "state_metadata": getattr(full_state, "_metadata", None) or {}}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(_unshare(state), str(path), metadata={"prunekit_plan": json.dumps(plan)})
    else:
        torch.save({"prunekit_plan": json.dumps(plan), "state_dict": state}, path)


def load_pruned(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved with :func:`save_pruned` (any of its formats): ``model`` is a fresh instance
    of the original, unpruned class (built with the same configuration); its tensors are sliced as the
    plan says, its shape attributes updated, and the saved weights loaded (strictly). Returns ``model``.

    Everything is checked first (the file, then every key and shape against what the plan makes of
    the model): a failed load raises and leaves ``model`` as it was."""
    from .compressed import is_compressed_file, load_compressed, load_into

    if is_compressed_file(path):
        return load_compressed(model, path)
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            plan = json.loads(handle.metadata()["prunekit_plan"])
        state = load_file(str(path))
    else:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            plan, state = json.loads(saved["prunekit_plan"]), saved["state_dict"]
        except Exception as error:
            raise ValueError(
                f"{os.fspath(path)!r} is not a file written by pk.save_pruned, or it is corrupt "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            ) from error
    return load_into(model, plan, state, plan.get("state_metadata", {}))


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give each its own copy."""
    seen: set[int] = set()
    result = {}
    for key, value in state.items():
        pointer = value.data_ptr()
        result[key] = value.clone() if pointer in seen and value.numel() else value
        seen.add(pointer)
    return result
