"""Checks on the repository itself: what a merge or an edit can break without any test failing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^(<{7} |={7}$|>{7} )", re.MULTILINE)


def test_no_merge_conflict_markers_are_left():
    files = [ROOT / "README.md", *ROOT.glob("src/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]
    files += list(ROOT.glob("benchmarks/results/*.md"))
    left = [str(path.relative_to(ROOT)) for path in files if MARKER.search(path.read_text(encoding="utf-8"))]
    assert not left, f"merge conflict markers left in {left}"
