"""Export a (compacted) model to ONNX and check onnxruntime's outputs against PyTorch's.

A compacted model (``pk.compact``) is a plain dense model with smaller layers, so every exporter reads it:
``torch.onnx.export``, ``torch.jit.trace`` / ``torch.jit.script`` and ``torch.export.export``. This module
adds one step users forget: running the exported file and comparing. Needs the ``export`` extra
(``pip install prunekit[export]``: onnx, onnxruntime, onnxscript).

Sparse-kernel models (:func:`prunekit.to_sparse`) do not export: ONNX has no CSR matrix product; export
``pk.to_dense(model)`` (or the compacted model) instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.inputs import call_model


@dataclass
class OnnxExport:
    """Where :func:`export_onnx` wrote the file, its size in bytes (with a ``.data`` file of external weights
    beside it, if any), and the largest absolute difference
    between onnxruntime's outputs and PyTorch's on the example inputs (``None`` without ``check``)."""

    path: Path
    size_bytes: int
    max_abs_error: float | None


def _leaves(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if hasattr(output, "to_tuple"):  # Hugging Face ModelOutput: its fields in order, Nones left out
        output = output.to_tuple()
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [leaf for value in output for leaf in _leaves(value)]
    return []


class _Positional(nn.Module):
    """``model`` called with keyword inputs given positionally, returning its output tensors as a tuple:
    both ONNX exporters take positional tensors and return flat outputs most reliably."""

    def __init__(self, model: nn.Module, names: list[str] | None):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        output = self.model(**dict(zip(self.names, inputs))) if self.names else self.model(*inputs)
        return tuple(_leaves(output))


def _arguments(example_inputs: Any) -> tuple[list[str] | None, list[str], tuple]:
    """(keyword names or None, graph input names, input tensors in the order the graph takes them)."""
    if isinstance(example_inputs, dict):
        names = list(example_inputs)
        return names, names, tuple(example_inputs[n] for n in names)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return None, [f"input_{i}" for i in range(len(inputs))], inputs


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    check: bool = True,
    tolerance: float = 1e-4,
    dynamo: bool = False,
    **export_options: Any,
) -> OnnxExport:
    """Export ``model`` (in eval mode) to the ONNX file ``path`` with ``torch.onnx.export`` and, with
    ``check``, run the file in onnxruntime on ``example_inputs`` and raise ``ValueError`` if any output
    differs from PyTorch's by more than ``tolerance`` × the largest absolute PyTorch output.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs (Hugging Face
    models); graph inputs are named after the dict keys, else ``input_0``, ``input_1``…
    ``dynamo``: use torch's newer dynamo-based exporter instead of the TorchScript-based one (it needs
    onnxscript). ``export_options`` go to ``torch.onnx.export`` (e.g. ``opset_version``, ``dynamic_axes``).
    The model is restored to its training mode afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if any(getattr(m, "prunekit_sparse_layer", False) for m in model.modules()):
        raise ValueError("ONNX has no sparse matrix product: export pk.to_dense(model) instead of the to_sparse model")
    path = Path(path)
    keywords, names, tensors = _arguments(example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = _leaves(call_model(model, example_inputs))
            options = {"input_names": names, "dynamo": dynamo, **export_options}
            if dynamo:
                options.setdefault(
                    "external_data", False
                )  # one self-contained file, as the TorchScript exporter writes
            torch.onnx.export(_Positional(model, keywords).eval(), tensors, str(path), **options)
    finally:
        model.train(was_training)
    error = _compare(path, names, tensors, expected, tolerance) if check else None
    external = path.with_name(path.name + ".data")  # weights torch wrote beside the graph (external_data=True)
    size = path.stat().st_size + (external.stat().st_size if external.exists() else 0)
    return OnnxExport(path, size, error)


def _compare(path: Path, names: list[str], tensors: list, expected: list[torch.Tensor], tolerance: float) -> float:
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            "checking an ONNX export needs onnxruntime: pip install prunekit[export] (or pass check=False)"
        ) from error
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph_inputs = {i.name for i in session.get_inputs()}
    feed = {name: t.detach().cpu().numpy() for name, t in zip(names, tensors) if name in graph_inputs}
    results = session.run(None, feed)
    if len(results) < len(expected):
        raise ValueError(f"the ONNX graph has {len(results)} outputs, PyTorch's model {len(expected)}")
    worst = 0.0
    for index, (reference, result) in enumerate(zip(expected, results)):
        result = torch.from_numpy(result)
        if tuple(result.shape) != tuple(reference.shape):
            raise ValueError(f"output {index}: ONNX shape {tuple(result.shape)}, PyTorch {tuple(reference.shape)}")
        if not reference.is_floating_point():
            continue
        difference = float((result.float() - reference.float().cpu()).abs().max()) if reference.numel() else 0.0
        scale = max(float(reference.abs().max()) if reference.numel() else 0.0, 1e-6)
        if difference > tolerance * scale:
            raise ValueError(
                f"output {index} of {path} differs from PyTorch's by {difference:.3g} (largest output {scale:.3g}, "
                f"tolerance {tolerance:g} of it)"
            )
        worst = max(worst, difference)
    return worst
