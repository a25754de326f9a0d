"""Global magnitude pruning of torchvision's ResNet-50 to 90%: time and extra peak memory.

Compares, in the same run and on the same machine:

- the reference: one pass computing |w| over every Conv/Linear weight (the least any magnitude pruner does);
- ``pk.prune(model, 0.9, criterion="magnitude", granularity="weight", scope="global")``;
- ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=0.9)``.

Each measurement runs in a fresh process on a freshly built model (random weights, ``weights=None``),
so peak-memory figures are not polluted by earlier runs. Targets (issue #2): prunekit at most 10× the
|w| pass and at most 0.5× the weights' bytes of extra peak memory.

Run:  python benchmarks/global_magnitude_resnet50.py        (needs torchvision; ~2 minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, PeakMemory, machine, median_time, today, write_result  # noqa: E402

SPARSITY = 0.9
METHODS = ("abs_pass", "prunekit", "torch_prune")


def _model():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


def _weights(model):
    return [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def _abs_pass(weights) -> None:
    for weight in weights:
        weight.abs()


def worker(method: str) -> dict:
    """One measurement in this process: seconds and extra peak bytes of ``method`` on a fresh ResNet-50."""
    torch.set_grad_enabled(False)
    model = _model()
    weights = _weights(model)
    n_weights = sum(w.numel() for w in weights)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    result = {"method": method, "weights": n_weights, "weight_bytes": weight_bytes}
    if method == "abs_pass":
        with PeakMemory() as memory:
            result["seconds"] = median_time(lambda: _abs_pass(weights), repeats=7)
        result["extra_bytes"] = memory.extra
        return result
    import time

    import prunekit as pk

    with PeakMemory() as memory:
        start = time.perf_counter()
        if method == "prunekit":
            pk.prune(model, SPARSITY, criterion="magnitude", granularity="weight", scope="global")
        else:
            import torch.nn.utils.prune as torch_prune

            params = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
            torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=SPARSITY)
        result["seconds"] = time.perf_counter() - start
    result["extra_bytes"] = memory.extra
    result["pruned"] = sum(int((w == 0).sum()) for w in _weights(model))
    return result


def run_worker(method: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per method (median reported)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return

    runs = {method: [run_worker(method) for _ in range(args.repeats)] for method in METHODS}
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "extra_bytes")} for m, rs in runs.items()}
    info = runs["abs_pass"][0]
    reference = med["abs_pass"]["seconds"]
    expected_pruned = round(SPARSITY * info["weights"])

    rows = []
    for method, label in (
        ("abs_pass", "one |w| pass (reference)"),
        ("prunekit", "pk.prune, global magnitude"),
        ("torch_prune", "torch.nn.utils.prune.global_unstructured"),
    ):
        pruned = runs[method][0].get("pruned")
        rows.append(
            f"| {label} | {med[method]['seconds'] * 1e3:.0f} | {med[method]['seconds'] / reference:.1f}× | "
            f"{med[method]['extra_bytes'] / 2**20:.0f} | {med[method]['extra_bytes'] / info['weight_bytes']:.2f}× | "
            f"{'-' if pruned is None else f'{pruned:,}'} |"
        )
    speedup = med["torch_prune"]["seconds"] / med["prunekit"]["seconds"]
    memory_ratio = med["torch_prune"]["extra_bytes"] / max(med["prunekit"]["extra_bytes"], 1)
    text = f"""# Global magnitude pruning of ResNet-50 to 90%

Machine: {machine()}. Date: {today()}.
Command: `python benchmarks/global_magnitude_resnet50.py` (median of {args.repeats} fresh processes per row).

torchvision ResNet-50 (random weights), {info["weights"]:,} Conv/Linear weights, {info["weight_bytes"] / 2**20:.0f} MiB.
Target: prune {expected_pruned:,} weights (90%) by one global |w| threshold.

| method | time (ms) | × one \\|w\\| pass | extra peak memory (MiB) | × weights' bytes | weights at zero after |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

- prunekit vs torch.nn.utils.prune: **{speedup:.1f}× faster**, **{memory_ratio:.1f}× less extra memory**.
- Targets (issue #2): ≤ 10× the |w| pass → {med["prunekit"]["seconds"] / reference:.1f}×;
  ≤ 0.5× the weights' bytes of extra peak memory → {med["prunekit"]["extra_bytes"] / info["weight_bytes"]:.2f}×.
- prunekit's extra memory includes its bit-packed masks (1 bit per weight) kept on the model;
  torch.nn.utils.prune keeps `weight_orig` and a float `weight_mask` per layer (2 extra copies).
- "Peak" is the process's resident high-water mark (`/proc/self/status` VmHWM after resetting it),
  so it counts every temporary the call makes.
"""
    path = write_result("global_magnitude_resnet50", text)
    _plot(med, info)
    print(text)
    print(f"wrote {path}")


def _plot(med: dict, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["|w| pass", "prunekit", "torch.nn.utils.prune"]
    keys = list(METHODS)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(labels, [med[k]["seconds"] * 1e3 for k in keys], color=["#999", "#2a7", "#c55"])
    left.set_ylabel("time (ms)")
    left.set_yscale("log")
    left.set_title("time to prune ResNet-50 to 90%")
    right.bar(labels, [med[k]["extra_bytes"] / 2**20 for k in keys], color=["#999", "#2a7", "#c55"])
    right.axhline(0.5 * info["weight_bytes"] / 2**20, color="k", ls="--", lw=1, label="0.5× weights' bytes")
    right.set_ylabel("extra peak memory (MiB)")
    right.set_title("extra peak memory")
    right.legend()
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "global_magnitude_resnet50.png", dpi=120)


if __name__ == "__main__":
    main()
