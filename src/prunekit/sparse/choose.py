"""Choosing a kernel per layer: which sparse forms a weight allows, and which runs fastest on its input.

The choice is measured, never guessed: dense and every candidate run in turn on the layer's own input
from the example batch (after warm-up), several rounds, and the median seconds per call decide. A sparse
kernel replaces the dense layer only when it is faster by at least ``min_gain`` (a ratio, 1.05 = 5%),
so noise cannot make a model slower.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .kernels import SparseConv2d, SparseLayer, SparseLinear, conv2d_supported

#: Tile shapes (rows, columns) tried for BSR, largest first; square, as torch's CPU kernel (MKL) requires.
BLOCK_SIZES = ((64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2))
#: A weight is block-structured for a tile shape when its non-zeros fill at least this fraction of the
#: tiles that hold any (BSR stores and multiplies the zeros inside a tile).
MIN_TILE_FILL = 0.75


@dataclass
class Choice:
    """What :func:`prunekit.to_sparse` decided for one layer.

    ``kernel``: ``"csr"``, ``"csr-linear"``, ``"bsr"``, ``"semi"`` or ``"dense"`` (the layer stays as it was).
    ``seconds``: median seconds per call of each form measured (``{}`` when the kernel was forced).
    ``gain``: dense seconds / chosen seconds (1.0 for dense, ``None`` when not measured).
    ``batch``: the leading size of the example input it was measured at. ``reason``: why dense, if it is.
    """

    name: str
    kernel: str
    blocksize: tuple[int, int] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    gain: float | None = None
    batch: int | None = None
    reason: str = ""

    def describe(self) -> str:
        """e.g. ``"csr ×2.4 at batch 16"``, ``"bsr 16×16 (forced)"``, ``"dense (csr ×0.8 at batch 1)"``."""
        label = self.kernel if self.kernel != "bsr" else f"bsr {self.blocksize[0]}×{self.blocksize[1]}"
        if self.kernel == "dense":
            measured = {k: v for k, v in self.seconds.items() if k != "dense"}
            if measured and "dense" in self.seconds:
                best = min(measured, key=measured.get)
                return (
                    f"dense (best sparse: {best} ×{self.seconds['dense'] / measured[best]:.2f} at batch {self.batch})"
                )
            return f"dense ({self.reason})" if self.reason else "dense"
        if self.gain is None:
            return f"{label} (forced)"
        return f"{label} ×{self.gain:.2f} at batch {self.batch}"


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """A layer's weight as the ``(out, in)`` matrix its product uses (Conv1D transposed, conv flattened)."""
    weight = layer.weight.detach()
    if type(layer).__name__ == "Conv1D":
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


def block_size(matrix: torch.Tensor, sizes=BLOCK_SIZES, min_fill: float = MIN_TILE_FILL) -> tuple[int, int] | None:
    """The largest tile shape from ``sizes`` that divides ``matrix`` and whose non-empty tiles are at
    least ``min_fill`` full (non-zeros / (non-empty tiles × tile size)); ``None`` if none is, or if the
    matrix has no non-zero."""
    nonzero = matrix != 0
    count = int(nonzero.sum())
    if count == 0:
        return None
    rows, cols = matrix.shape
    for height, width in sorted(sizes, key=lambda s: -s[0] * s[1]):
        if rows % height or cols % width or height * width == 1:
            continue
        tiles = nonzero.reshape(rows // height, height, cols // width, width).any(dim=3).any(dim=1)
        if count >= min_fill * int(tiles.sum()) * height * width:
            return height, width
    return None


def is_two_four(matrix: torch.Tensor) -> bool:
    """Whether every run of 4 consecutive weights along the input dimension has at most 2 non-zeros."""
    rows, cols = matrix.shape
    return cols % 4 == 0 and bool(((matrix != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def unsupported(layer: nn.Module) -> str | None:
    """Why ``layer`` has no sparse form, or ``None`` when it has one."""
    if isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D":
        return None
    if isinstance(layer, nn.Conv2d):
        return conv2d_supported(layer)
    return f"{type(layer).__name__} has no sparse form"


def build(layer: nn.Module, kernel: str, blocksize: tuple[int, int] | None = None) -> SparseLayer:
    """The sparse module for ``layer`` running ``kernel``."""
    if isinstance(layer, nn.Conv2d):
        return SparseConv2d(layer, kernel, blocksize)
    return SparseLinear(layer, kernel, blocksize)


def candidates(layer: nn.Module) -> dict[str, tuple[int, int] | None]:
    """The sparse kernels ``layer``'s weight allows here: ``{kernel: blocksize}``. CSR always (and for a
    Linear/Conv1D CSR multiplied as ``F.linear``); BSR when the
    weight is block-structured; 2:4 semi-structured on CUDA for a 2:4 weight in a dtype torch supports."""
    matrix = weight_matrix(layer)
    found: dict[str, tuple[int, int] | None] = {"csr": None}
    if not isinstance(layer, nn.Conv2d):
        found["csr-linear"] = None
    tiles = block_size(matrix)
    if tiles is not None:
        found["bsr"] = tiles
    if matrix.is_cuda and is_two_four(matrix) and matrix.dtype in (torch.float16, torch.bfloat16, torch.float32):
        found["semi"] = None
    return found


def interleaved_seconds(
    calls: dict[str, Callable[[], object]],
    rounds: int = 21,
    min_seconds: float = 0.001,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each function over the rounds of :func:`interleaved_times`."""
    times = interleaved_times(calls, rounds, min_seconds, clock)
    return {name: statistics.median(values) for name, values in times.items()}


def interleaved_times(
    calls: dict[str, Callable[[], object]],
    rounds: int = 21,
    min_seconds: float = 0.001,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each function, one value per round: two warm-up calls each, then ``rounds``
    rounds in which every function runs in turn, each enough times in a row to take about ``min_seconds``.

    Many short runs rather than a few long ones: on a CPU shared with other processes a run of about a
    millisecond mostly fits in one scheduler time slice, so the median is the uncontended time, while
    runs of tens of milliseconds are cut by preemption at random and two identical models can measure
    several times apart. ``clock``: ``time.perf_counter`` (wall time), or ``time.thread_time`` to count
    only the CPU time of the calling thread (with ``torch.set_num_threads(1)``, the compute time without
    the time other processes took)."""
    repeats = {}
    for name, call in calls.items():
        call()
        _synchronize()
        start = clock()
        call()
        _synchronize()
        once = max(clock() - start, 1e-7)
        repeats[name] = max(1, min(1000, round(min_seconds / once)))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = clock()
            for _ in range(repeats[name]):
                call()
            _synchronize()
            times[name].append((clock() - start) / repeats[name])
    return times


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _close(reference: torch.Tensor, result: torch.Tensor) -> bool:
    if reference.shape != result.shape:
        return False
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    tolerance = 1e-2 if reference.dtype in (torch.float16, torch.bfloat16) else 1e-4
    return bool(torch.allclose(result.float(), reference.float(), rtol=tolerance, atol=tolerance * max(scale, 1e-6)))


def choose(
    name: str,
    layer: nn.Module,
    inputs: torch.Tensor,
    *,
    rounds: int = 21,
    min_gain: float = 1.05,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[SparseLayer | None, Choice]:
    """Measure ``layer`` against each of its :func:`candidates` on ``inputs`` (its input in the example
    batch) and return the fastest sparse module with its :class:`Choice`, or ``(None, choice)`` when dense
    stays (no sparse kernel faster by ``min_gain``, or none gives the dense output)."""
    batch = int(inputs.shape[0]) if inputs.ndim else 1
    with torch.no_grad():
        reference = layer(inputs)
        built: dict[str, SparseLayer] = {}
        blocks = {}
        for kernel, blocksize in candidates(layer).items():
            try:
                module = build(layer, kernel, blocksize)
                ok = _close(reference, module(inputs))
            except (RuntimeError, ValueError, NotImplementedError):
                continue  # a kernel torch lacks for this dtype, device or shape is no candidate
            if ok:
                built[kernel], blocks[kernel] = module, blocksize
        if not built:
            return None, Choice(name, "dense", batch=batch, reason="no sparse kernel gives the dense output")
        calls = {"dense": lambda: layer(inputs)}
        calls.update({kernel: (lambda m=module: m(inputs)) for kernel, module in built.items()})
        seconds = interleaved_seconds(calls, rounds, clock=clock)
    best = min(built, key=seconds.get)
    gain = seconds["dense"] / seconds[best]
    if gain < min_gain:
        return None, Choice(name, "dense", seconds=seconds, gain=1.0, batch=batch, reason="dense is fastest")
    module = built[best]
    module.measured_gain, module.measured_batch = gain, batch
    return module, Choice(name, best, blocks[best], seconds, gain, batch)
