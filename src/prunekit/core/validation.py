"""Checks shared by the entry points, each raising before anything changes."""

from __future__ import annotations


def check_whole(value: object, what: str, unit: str, minimum: int = 0) -> int:
    """``value`` if it is a whole number ≥ ``minimum``; else ``ValueError`` naming ``what`` and its unit."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be a whole number of {unit} ≥ {minimum}, got {value!r}")
    return value
