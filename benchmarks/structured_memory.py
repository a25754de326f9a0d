"""Extra peak memory of structured pruning with reconstruction on the real all-MiniLM-L6-v2.

One measurement per process (``python benchmarks/structured_memory.py [src folder]``: run it once with
PYTHONPATH at the source to measure, e.g. this commit and the commit before): Wanda groups at ~15% of
the parameters, ``reconstruct=True`` and ``"bias"``, 64 calibration docstrings of the Python standard
library in batches of 16 (padded, max_length 128). Extra peak = VmHWM during the call (after resetting
it through /proc/self/clear_refs) minus the resident set before it; the model itself is 87 MiB.
Prints one JSON line per mode.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import PeakMemory  # noqa: E402
from oneshot_minilm import BATCH, CALIBRATION_FILES, batches, load  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.bench.text_lm import docstrings, stdlib_files  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    mode = {"true": True, "bias": "bias"}[sys.argv[1]]
    _, tokenizer, model = load()
    calibration = batches(tokenizer, docstrings(stdlib_files(*CALIBRATION_FILES))[:64], BATCH)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    with PeakMemory() as peak:
        pruner = pk.prune(model, sparsity=0.15, sparsity_in="params", granularity="out_channel", criterion="wanda",
                          calibration=calibration, example_inputs=calibration[0], reconstruct=mode)  # fmt: skip
    print(json.dumps({"reconstruct": sys.argv[1], "extra_peak_mib": peak.extra / 2**20, "model_mib": size / 2**20,
                      "layers_corrected": len(pruner.reconstruction), "prunekit": pk.__file__}))  # fmt: skip


if __name__ == "__main__":
    main()
