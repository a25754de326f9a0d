"""SparseGPT's per-block mask selection on CPU: selection by k-th value (prunekit) vs a stable sort.

For the two MLP shapes of TinyLlama-1.1B (down_proj 2048 × 5632, up/gate 5632 × 2048; random weights in
bfloat16, H = 2XᵀX/n from 1024 (resp. 2816) random tokens), ``sparsegpt_prune`` at 50% is run with its
own selection and with the stable sort it replaced (patched in here), alternately, and the results are
compared bit for bit. Medians of ``--rounds`` alternations, 1 thread.

Run:  python benchmarks/sparsegpt_selection.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, today, write_result  # noqa: E402

from prunekit.oneshot import sparsegpt as module  # noqa: E402

SHAPES = ((2048, 5632), (5632, 2048))


def sorted_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The selection before: the first ``count`` indices of a stable ascending sort."""
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count:
        pruned[torch.sort(scores.reshape(-1), stable=True).indices[:count]] = True
    return pruned.view_as(scores)


def run(weight, hessian, lowest):
    original = module._lowest
    module._lowest = lowest
    try:
        start = time.perf_counter()
        result = module.sparsegpt_prune(weight, hessian, 0.5)
        return result, time.perf_counter() - start
    finally:
        module._lowest = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "# SparseGPT mask selection: k-th value vs stable sort (benchmarks/sparsegpt_selection.py)",
        "",
        f"{today()}; {machine()}; shared with other work. Libraries: torch {md.version('torch')}, "
        f"prunekit {md.version('prunekit')}.",
        f"sparsegpt_prune at 50%, one Linear, medians of {args.rounds} alternating rounds.",
        "",
        "| weight (out × in) | stable sort s | k-th value s | ratio | identical weights and mask |",
        "|---|---|---|---|---|",
    ]
    for rows, cols in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(max(cols // 2, 1024), cols)
        hessian = 2 * x.T @ x / x.shape[0]
        weight = torch.randn(rows, cols).bfloat16()
        times = {"sort": [], "kth": []}
        same = True
        for _ in range(args.rounds):
            (w_sort, k_sort), t_sort = run(weight, hessian, sorted_lowest)
            (w_kth, k_kth), t_kth = run(weight, hessian, module._lowest)
            times["sort"].append(t_sort)
            times["kth"].append(t_kth)
            same &= torch.equal(w_sort, w_kth) and torch.equal(k_sort, k_kth)
        sort, kth = statistics.median(times["sort"]), statistics.median(times["kth"])
        lines.append(f"| {rows} × {cols} | {sort:.2f} | {kth:.2f} | {kth / sort:.2f} | {'yes' if same else 'NO'} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines + [""])
    write_result("sparsegpt_selection", text)
    print(text)


if __name__ == "__main__":
    main()
