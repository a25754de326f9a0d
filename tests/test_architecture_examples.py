"""Runs every ``python`` block of ARCHITECTURE.md, in order, in one namespace: the "how to extend"
examples there are executed, not just shown."""

import re
from pathlib import Path

import prunekit as pk

DOC = Path(__file__).resolve().parents[1] / "ARCHITECTURE.md"


def blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_architecture_examples_run():
    code = blocks()
    assert len(code) >= 5
    namespace = {}
    registered_layers = []
    original = pk.register_layer

    def remember(kind, handler):  # so the test leaves the registry as it found it
        registered_layers.append(kind)
        return original(kind, handler)

    pk.register_layer = remember
    try:
        for index, block in enumerate(code):
            exec(compile(block, f"ARCHITECTURE.md block {index + 1}", "exec"), namespace)
    finally:
        pk.register_layer = original
        for kind in registered_layers:
            pk.unregister_layer(kind)
        from prunekit.methods.criteria import CRITERIA
        from prunekit.methods.granularity import GRANULARITIES

        CRITERIA.pop("obd_diagonal", None)
        GRANULARITIES.pop("stripe", None)
