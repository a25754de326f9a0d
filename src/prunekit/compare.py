"""Side by side: a dense model and its pruned (or compacted) version — parameters, non-zeros, MACs, the
size of a saved file and the measured latency, with the ratio of each."""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .core.inputs import call_model
from .summary import summary


@dataclass
class Comparison:
    """``rows``: ``(what, unit, dense value, pruned value)``; ``str()`` prints them with ratios."""

    rows: list[tuple[str, str, float, float]]

    def value(self, what: str) -> tuple[float, float]:
        """(dense, pruned) of the row named ``what`` (e.g. ``"parameters"``)."""
        for name, _, dense, pruned in self.rows:
            if name == what:
                return dense, pruned
        raise KeyError(f"no row {what!r}; rows are {[row[0] for row in self.rows]}")

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {name: {"unit": unit, "dense": dense, "pruned": pruned} for name, unit, dense, pruned in self.rows}

    def __str__(self) -> str:
        lines = [f"{'':<22}{'dense':>14}{'pruned':>14}{'pruned/dense':>14}"]
        for name, unit, dense, pruned in self.rows:
            ratio = f"{pruned / dense:.3f}" if dense else "-"
            shown = f"{name} ({unit})" if unit else name
            lines.append(f"{shown:<22}{_number(dense):>14}{_number(pruned):>14}{ratio:>14}")
        return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.3f}"


def file_size(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: zeros cost as much as any value (masks do not
    shrink files; compaction and ``pk.save_pruned(..., sparse=True)`` do)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


@torch.inference_mode()
def measure_latency(models: list[nn.Module], example_inputs: Any, rounds: int = 5, repeats: int = 10) -> list[float]:
    """Median milliseconds per call of each model on ``example_inputs``, measured interleaved (the
    models take turns, ``rounds`` times, ``repeats`` calls each) so a machine's load affects all alike."""
    states = [model.training for model in models]
    for model in models:
        model.eval()
        call_model(model, example_inputs)  # warm-up
    times: list[list[float]] = [[] for _ in models]
    try:
        for _ in range(rounds):
            for index, model in enumerate(models):
                start = time.perf_counter()
                for _ in range(repeats):
                    call_model(model, example_inputs)
                times[index].append(1000 * (time.perf_counter() - start) / repeats)
    finally:
        for model, training in zip(models, states):
            model.train(training)
    return [statistics.median(values) for values in times]


def compare(
    dense: nn.Module, pruned: nn.Module, example_inputs: Any, *, rounds: int = 5, repeats: int = 10
) -> Comparison:
    """Parameters, non-zero parameters, MACs, non-zero MACs (counted by :func:`prunekit.summary` on
    ``example_inputs``), file size in bytes and median latency in milliseconds of both models.

    Latency runs on whatever device the models are on, in eval mode without gradients; the numbers are
    this machine's, now (noisy on a shared machine: raise ``rounds``)."""
    reports = [summary(model, example_inputs=example_inputs) for model in (dense, pruned)]
    latencies = measure_latency([dense, pruned], example_inputs, rounds=rounds, repeats=repeats)
    rows = [
        ("parameters", "", *(float(r.total_params) for r in reports)),
        ("non-zero parameters", "", *(float(r.nonzero_params) for r in reports)),
        ("MACs", "", *(float(r.macs) for r in reports)),
        ("non-zero MACs", "", *(float(r.nonzero_macs) for r in reports)),
        ("file size", "bytes", float(file_size(dense)), float(file_size(pruned))),
        ("latency", "ms", *latencies),
    ]
    return Comparison(rows)
