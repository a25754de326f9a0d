"""Calibrated one-shot pruning of a causal language model trained here: perplexity per method.

A byte-level GPT-2 (4 blocks, width 128, context 128; ``prunekit.bench.text_lm``) is trained on the
Python standard library's sources (no downloads), then pruned by magnitude (layer-wise |w|), Wanda and
SparseGPT at 50% unstructured and 2:4, and at 70% with and without OWL. Only the blocks' Linear layers
are pruned (embeddings and the tied LM head stay dense), as in the papers. Perplexity over
non-overlapping windows of 128 bytes of held-out files, beside the published LLaMA-2-7B / WikiText-2
numbers (Sun et al. 2023, Table 2-3; Frantar & Alistarh 2023).

Run:  python benchmarks/oneshot_gpt.py [--owl-only]      (needs transformers)
``--owl-only`` trains the same model and runs only the 70% rows of Wanda and SparseGPT with and without OWL
(results/oneshot_gpt_owl.md; the full run writes results/oneshot_gpt.md and its plot).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine, today, write_result  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.bench.text_lm import (  # noqa: E402
    TinyLMConfig,
    byte_tokens,
    calibration_windows,
    stdlib_files,
    train_tiny_lm,
)

TRAIN_FILES, EVAL_FILES = (0, 100), (120, 20)
CONFIG = TinyLMConfig(layers=4, width=128, heads=4, context=128, batch=16, steps=1000, lr=3e-3)
CALIBRATION, EVAL_WINDOWS = 128, 128
SETTINGS = {
    "50%": dict(sparsity=0.5),
    "2:4": dict(granularity=pk.NM(2, 4)),
    "70%": dict(sparsity=0.7),
}
METHODS = ("magnitude", "wanda", "sparsegpt", "wanda+owl", "sparsegpt+owl")
#: LLaMA-2-7B, WikiText-2 (dense 5.12), as published.
PUBLISHED = {
    ("50%", "magnitude"): 14.89,
    ("50%", "sparsegpt"): 6.51,
    ("50%", "wanda"): 6.42,
    ("2:4", "magnitude"): 54.59,
    ("2:4", "sparsegpt"): 10.17,
    ("2:4", "wanda"): 11.02,
}
BLOCKS = r"transformer\.h\..*"


def prune(model, method, setting, calibration):
    criterion = method.split("+")[0]
    options = dict(SETTINGS[setting], criterion=criterion)
    if method.endswith("+owl"):
        options["layer_sparsity"] = "owl"
    if criterion == "magnitude":
        return pk.prune(model, include=[BLOCKS], **options)
    return pk.prune(model, calibration=calibration, progress=False, **options)


def plot(ppl: dict, dense: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        points = [(j, ppl[(s, method)]) for j, s in enumerate(SETTINGS) if (s, method) in ppl]
        ax.bar([j + i * width for j, _ in points], [v / dense for _, v in points], width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SETTINGS))], list(SETTINGS))
    ax.set_ylabel("perplexity / dense perplexity")
    ax.set_yscale("log")
    ax.set_title("byte-level GPT-2 trained on the stdlib, one-shot pruning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--owl-only", action="store_true", help="only Wanda / SparseGPT at 70%%, with and without OWL")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    started = time.perf_counter()
    train_files, eval_files = stdlib_files(*TRAIN_FILES), stdlib_files(*EVAL_FILES)
    train = byte_tokens(train_files)
    held_out = byte_tokens(eval_files, EVAL_WINDOWS * CONFIG.context)
    model = train_tiny_lm(train, CONFIG)
    trained = time.perf_counter() - started
    calibration = calibration_windows(train, CALIBRATION, CONFIG.context, 16, seed=1)
    dense = pk.perplexity(model, held_out, window=CONFIG.context, batch_size=16)
    print("dense", dense, f"trained in {trained:.0f} s", flush=True)
    ppl, seconds = {}, {}
    for setting in SETTINGS:
        for method in METHODS:
            if setting == "2:4" and method.endswith("owl"):
                continue
            if setting == "50%" and method.endswith("owl"):
                continue
            if args.owl_only and (setting != "70%" or method == "magnitude"):
                continue
            pruned = copy.deepcopy(model)
            start = time.perf_counter()
            prune(pruned, method, setting, calibration)
            seconds[(setting, method)] = time.perf_counter() - start
            ppl[(setting, method)] = pk.perplexity(pruned, held_out, window=CONFIG.context, batch_size=16)
            print(setting, method, f"{ppl[(setting, method)]:.3f}", flush=True)
    total = time.perf_counter() - started
    libs = ", ".join(f"{n} {md.version(n)}" for n in ("torch", "transformers", "prunekit"))
    lines = [
        "# Calibrated one-shot pruning of a causal LM trained here (benchmarks/oneshot_gpt.py)",
        "",
        f"{today()}; {machine()}; shared with other work. Libraries: {libs}.",
        f"Model: byte-level GPT-2 (vocab 256), {CONFIG.layers} blocks, width {CONFIG.width}, {CONFIG.heads} heads, "
        f"context {CONFIG.context}; trained {CONFIG.steps} steps × {CONFIG.batch} windows of {CONFIG.context} bytes, "
        f"AdamW lr {CONFIG.lr:g} (warm-up, cosine), seed {CONFIG.seed}, on stdlib_files{TRAIN_FILES} "
        f"({train_files[0].name} … {train_files[-1].name}, {train.numel()} bytes) in {trained:.0f} s.",
        f"Calibration: {CALIBRATION} random windows of {CONFIG.context} bytes from the training files (seed 1), "
        f"batches of 16. Evaluation: the first {EVAL_WINDOWS} non-overlapping windows of {CONFIG.context} bytes of "
        f"stdlib_files{EVAL_FILES} ({eval_files[0].name} … {eval_files[-1].name}), disjoint from training.",
        "Pruned: the 16 Linear (Conv1D) layers of the blocks; magnitude is layer-wise |w|.",
        "",
        f"Dense perplexity: **{dense:.3f}** (bytes).",
        "",
        "| sparsity | method | perplexity | × dense | LLaMA-2-7B published (dense 5.12) | × dense | prune s |",
        "|---|---|---|---|---|---|---|",
    ]
    for (setting, method), value in ppl.items():
        published = PUBLISHED.get((setting, method))
        pub = f"{published:.2f} | {published / 5.12:.2f}" if published else "— | —"
        lines.append(
            f"| {setting} | {method} | {value:.3f} | {value / dense:.3f} | {pub} | {seconds[(setting, method)]:.1f} |"
        )
    lines += [
        "",
        "OWL at 70% on LLaMA-1-7B (published): Wanda 85.77 → 24.55, SparseGPT 26.30 → 19.49 (dense 5.68).",
        f"Whole benchmark: {total / 60:.1f} minutes.",
        "",
    ]
    text = "\n".join(lines)
    if args.owl_only:
        write_result("oneshot_gpt_owl", text)
    else:
        write_result("oneshot_gpt", text)
        plot(ppl, dense, RESULTS / "oneshot_gpt.png")
    print(text)


if __name__ == "__main__":
    main()
