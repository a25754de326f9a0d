"""Progress bars of the one-shot passes (tqdm, an optional dependency: without it, no bar)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def progress_bar(total: int, enabled: bool, what: str, unit: str = "block") -> Any:
    """A tqdm bar of ``total`` steps named ``what`` (cleared when done), or None when ``enabled`` is
    False or tqdm is not installed."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=total, desc=what, unit=unit, leave=False)
    return None


def check_progress(progress: object) -> bool:
    """``progress`` itself, refused unless it is True or False (a string such as "no" would read as True)."""
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    return progress


def with_progress(items: list[T], enabled: bool, what: str, unit: str) -> Iterator[T]:
    """The items, one by one, advancing a bar over them (see :func:`progress_bar`); the bar is closed
    however the loop ends."""
    bar = progress_bar(len(items), enabled, what, unit)
    try:
        for item in items:
            yield item
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
