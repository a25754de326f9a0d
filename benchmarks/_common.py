"""Shared helpers for the benchmarks: peak-memory probes, timing, machine description, result files."""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def trim_memory() -> None:
    """Return freed memory to the OS so the resident set measures what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Extra peak resident memory (bytes) of the code run inside the ``with`` block.

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` ← 5) on entry, so the peak is the
    block's own, not the process's earlier history. Run each measurement in a fresh process when
    earlier work may have left freed memory cached.
    """

    def __enter__(self):
        trim_memory()
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        self.before = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        self.peak = _status_kib("VmHWM") * 1024
        self.extra = self.peak - self.before
        return False


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def today() -> str:
    return datetime.date.today().isoformat()


def write_result(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    return path
