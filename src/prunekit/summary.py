"""Summary: parameters, non-zeros, sparsity and MACs, per layer and in total.

MACs (multiply-accumulates) are counted for Linear, Conv and ConvTranspose layers from shapes, for one
forward pass of ``example_inputs`` as given (batch included). A weight that is zero does no useful
work, so "non-zero MACs" counts each non-zero weight once per position it is applied at: the
theoretical cost of a sparse layer (ShrinkBench's "theoretical speedup" is dense MACs / non-zero MACs).
Without ``example_inputs`` a Linear counts as applied once and conv MACs are unknown (``None``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class LayerStats:
    """One row of the summary: a module with parameters of its own."""

    name: str
    kind: str
    params: int
    nonzero_params: int
    macs: int | None = None
    nonzero_macs: int | None = None

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0


@dataclass
class Summary:
    """Per-layer rows and totals; ``str()`` prints a table, :meth:`to_dict` gives plain numbers."""

    layers: list[LayerStats] = field(default_factory=list)
    #: Lines printed under the table (e.g. what a structured sparsity counted).
    notes: list[str] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def nonzero_params(self) -> int:
        return sum(layer.nonzero_params for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of all parameters that are zero."""
        return 1.0 - self.nonzero_params / self.total_params if self.total_params else 0.0

    @property
    def compression(self) -> float:
        """total / non-zero parameters (ShrinkBench's compression ratio)."""
        return self.total_params / self.nonzero_params if self.nonzero_params else float("inf")

    @property
    def macs(self) -> int:
        return sum(layer.macs or 0 for layer in self.layers)

    @property
    def nonzero_macs(self) -> int:
        return sum(layer.nonzero_macs or 0 for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_params": self.total_params,
            "nonzero_params": self.nonzero_params,
            "sparsity": self.sparsity,
            "compression": self.compression,
            "macs": self.macs,
            "nonzero_macs": self.nonzero_macs,
            "layers": [dict(asdict(layer), sparsity=layer.sparsity) for layer in self.layers],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        header = ("layer", "type", "params", "non-zero", "sparsity", "MACs", "non-zero MACs")
        rows = [
            (
                layer.name or "<root>",
                layer.kind,
                f"{layer.params:,}",
                f"{layer.nonzero_params:,}",
                f"{layer.sparsity:.1%}",
                "-" if layer.macs is None else f"{layer.macs:,}",
                "-" if layer.nonzero_macs is None else f"{layer.nonzero_macs:,}",
            )
            for layer in self.layers
        ]
        total = (
            "total",
            "",
            f"{self.total_params:,}",
            f"{self.nonzero_params:,}",
            f"{self.sparsity:.1%}",
            f"{self.macs:,}",
            f"{self.nonzero_macs:,}",
        )
        widths = [max(len(str(row[i])) for row in [header, *rows, total]) for i in range(len(header))]

        def line(row):
            return "  ".join(
                str(cell).ljust(width) if i < 2 else str(cell).rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths))
            )

        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *map(line, rows), rule, line(total), *self.notes])

    __repr__ = __str__


def _positions(model: nn.Module, example_inputs: Any) -> dict[nn.Module, int]:
    """How many times each Linear/Conv weight is applied in one forward pass of ``example_inputs``."""
    counted: dict[nn.Module, int] = {}

    def hook(module, inputs, output):
        if isinstance(module, _CONV_T):
            positions = inputs[0].numel() // module.in_channels
        elif isinstance(module, _CONV):
            positions = output.numel() // module.out_channels
        else:
            positions = output.numel() // module.out_features
        counted[module] = counted.get(module, 0) + positions

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, *_CONV, *_CONV_T))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                model(*example_inputs)
            else:
                model(example_inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return counted


def summary(model: nn.Module, example_inputs: Any = None) -> Summary:
    """Count parameters, non-zeros and MACs of ``model``, per module and in total.

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs; the model
    runs once on it (in eval mode, without gradients) to learn how often each layer is applied.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    positions = _positions(model, example_inputs) if example_inputs is not None else {}
    rows = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not params:
            continue
        seen.update(id(p) for p in params)
        total = sum(p.numel() for p in params)
        nonzero = sum(int(torch.count_nonzero(p.detach())) for p in params)
        row = LayerStats(name, type(module).__name__, total, nonzero)
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Linear, *_CONV, *_CONV_T)) and isinstance(weight, torch.Tensor):
            applied = positions.get(module)
            if applied is None and example_inputs is None and isinstance(module, nn.Linear):
                applied = 1
            if applied is not None:
                row.macs = weight.numel() * applied
                row.nonzero_macs = int(torch.count_nonzero(weight.detach())) * applied
            elif example_inputs is not None:
                row.macs = row.nonzero_macs = 0  # not reached by this input
        rows.append(row)
    return Summary(rows)
