"""The tracer's bookkeeping runs on one thread.

Its tensor operations (unique, isin, comparisons over id vectors) are short: split over several threads
they wait on each other more than they gain, most of all on a machine with few cores shared with other
work, where a trace ran several times slower with two threads than with one. The model's own
operations keep the caller's thread count; only the rules and the resolution of units run on one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)``; the previous count is restored, also on error."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
