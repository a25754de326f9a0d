"""OWL's two options on the real all-MiniLM-L6-v2 at 70%: uniform vs OWL for Wanda and SparseGPT.

The corpus, calibration and metric are those of ``oneshot_minilm.py`` (imported from it): 128 calibration
docstrings, 256 held-out ones, mean cosine between pruned and dense sentence embeddings. Rows: uniform
70% (every block alike), OWL with the paper's values (M = 5, λ = 0.08, Yin et al. 2024), and the grid
M ∈ {3, 5, 7} × λ ∈ {0.04, 0.08, 0.12}. The grid is measured on the evaluation set itself, so it shows how
sensitive the result is to the options; it is not a way to choose them (the defaults stay the paper's).
Each row also gives the block sparsities OWL chose (blocks 0..5).

``--paper-only`` runs only uniform and ``layer_sparsity="owl"`` (which every prunekit version accepts),
so the same protocol can be run on another checkout of prunekit for comparison.

Run:  HF_HUB_OFFLINE=1 python benchmarks/oneshot_owl_minilm.py [--paper-only]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, today, write_result  # noqa: E402
from _owl_grid import block_sparsities, grid_rows, plot_grid  # noqa: E402
from oneshot_minilm import (  # noqa: E402
    BATCH,
    CALIBRATION_FILES,
    CALIBRATION_TEXTS,
    EVAL_FILES,
    EVAL_TEXTS,
    batches,
    cosine,
    embed,
    load,
    versions,
)

import prunekit as pk  # noqa: E402
from prunekit.bench.text_lm import docstrings, stdlib_files  # noqa: E402

SPARSITY = 0.7
MULTIPLIERS = (3.0, 5.0, 7.0)
SPREADS = (0.04, 0.08, 0.12)
CRITERIA = ("wanda", "sparsegpt")


def rows(paper_only: bool) -> list[tuple[str, object]]:
    """(label, layer_sparsity) in the order they are run."""
    found = [("uniform", None), ("OWL (paper: M=5, λ=0.08)", "owl")]
    return found if paper_only else found + grid_rows(MULTIPLIERS, SPREADS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper-only", action="store_true", help="only uniform and layer_sparsity='owl'")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    started = time.perf_counter()
    path, tokenizer, dense_model = load()
    calib_files, eval_files = stdlib_files(*CALIBRATION_FILES), stdlib_files(*EVAL_FILES)
    calibration = batches(tokenizer, docstrings(calib_files)[:CALIBRATION_TEXTS], BATCH)
    evaluation = batches(tokenizer, docstrings(eval_files)[:EVAL_TEXTS], 64)
    dense = embed(dense_model, evaluation)
    results = {}
    for label, layer_sparsity in rows(args.paper_only):
        for criterion in CRITERIA:
            model = copy.deepcopy(dense_model)
            options = {} if layer_sparsity is None else {"layer_sparsity": layer_sparsity}
            pruner = pk.prune(
                model, sparsity=SPARSITY, criterion=criterion, calibration=calibration, progress=False, **options
            )
            report = pruner.calibration_report
            results[(label, criterion)] = (cosine(model, evaluation, dense), report.overall_sparsity, report)
            print(label, criterion, f"{results[(label, criterion)][0]:.4f}", block_sparsities(report), flush=True)
    seconds = time.perf_counter() - started
    lines = [
        "# OWL on all-MiniLM-L6-v2 at 70% (benchmarks/oneshot_owl_minilm.py)",
        "",
        f"{today()}; {machine()} (only quality is reported, no timing).",
        f"Libraries: {versions()}. Model: {path}.",
        f"Protocol of oneshot_minilm.py: calibration = the first {CALIBRATION_TEXTS} docstrings of stdlib_files"
        f"{CALIBRATION_FILES}, batches of {BATCH}; evaluation = the first {EVAL_TEXTS} docstrings of stdlib_files"
        f"{EVAL_FILES}; metric = mean cosine of pruned to dense sentence embeddings. The 36 Linear layers of the "
        "6 encoder blocks are pruned; OWL gives each block one sparsity (total exact); Wanda with its default "
        "(one calibration pass per block).",
        "",
        "![OWL against uniform](oneshot_owl_minilm.png)",
        "",
        "| layer sparsities | wanda | sparsegpt | block sparsities chosen (wanda; blocks 0–5) |",
        "|---|---|---|---|",
    ]
    for label, _ in rows(args.paper_only):
        wanda, sparsegpt = results[(label, "wanda")], results[(label, "sparsegpt")]
        lines.append(f"| {label} | {wanda[0]:.4f} | {sparsegpt[0]:.4f} | {block_sparsities(wanda[2])} |")
    lines += [
        "",
        "Reached sparsity of the pruned layers: "
        + ", ".join(
            f"{label} {c} {results[(label, c)][1]:.4f}" for label, _ in rows(args.paper_only) for c in CRITERIA
        ),
        f"Whole run: {seconds / 60:.1f} minutes.",
        "",
    ]
    text = "\n".join(lines)
    if not args.paper_only:
        written = write_result("oneshot_owl_minilm", text)
        cosines = {key: value[0] for key, value in results.items()}
        plot_grid(
            cosines,
            MULTIPLIERS,
            SPREADS,
            CRITERIA,
            written.with_suffix(".png"),
            "embedding cosine to dense",
            "OWL on all-MiniLM-L6-v2 (higher is better)",
            SPARSITY,
        )
    print(text)


if __name__ == "__main__":
    main()
