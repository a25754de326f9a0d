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
from _common import RESULTS, PeakMemory, machine, today, write_result  # noqa: E402

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
    """One process: the first ("cold") call of ``method`` on a fresh ResNet-50, with its extra peak
    memory, then the median of repeated ("warm") calls, each on a fresh model."""
    import time

    import prunekit as pk

    torch.set_grad_enabled(False)

    def run(model):
        weights = _weights(model)
        if method == "abs_pass":
            _abs_pass(weights)
        elif method == "prunekit":
            pk.prune(model, SPARSITY, criterion="magnitude", granularity="weight", scope="global")
        else:
            import torch.nn.utils.prune as torch_prune

            params = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
            torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=SPARSITY)

    model = _model()
    weights = _weights(model)
    result = {
        "method": method,
        "weights": sum(w.numel() for w in weights),
        "weight_bytes": sum(w.numel() * w.element_size() for w in weights),
    }
    with PeakMemory() as memory:
        start = time.perf_counter()
        run(model)
        result["cold_seconds"] = time.perf_counter() - start
    result["extra_bytes"] = memory.extra
    if method != "abs_pass":
        result["pruned"] = sum(int((w == 0).sum()) for w in _weights(model))
    repeats = {"abs_pass": 9, "prunekit": 5, "torch_prune": 1}[method]
    models = [model] * repeats if method == "abs_pass" else [_model() for _ in range(repeats)]
    times = []
    for each in models:
        start = time.perf_counter()
        run(each)
        times.append(time.perf_counter() - start)
    result["warm_seconds"] = statistics.median(times)
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
    keys = ("cold_seconds", "warm_seconds", "extra_bytes")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in runs.items()}
    info = runs["abs_pass"][0]
    cold_ref, warm_ref = med["abs_pass"]["cold_seconds"], med["abs_pass"]["warm_seconds"]
    expected_pruned = round(SPARSITY * info["weights"])

    rows = []
    for method, label in (
        ("abs_pass", "one \\|w\\| pass (reference)"),
        ("prunekit", "pk.prune, global magnitude"),
        ("torch_prune", "torch.nn.utils.prune.global_unstructured"),
    ):
        m = med[method]
        pruned = runs[method][0].get("pruned")
        rows.append(
            f"| {label} | {m['cold_seconds'] * 1e3:.0f} | {m['cold_seconds'] / cold_ref:.1f}× | "
            f"{m['warm_seconds'] * 1e3:.1f} | {m['warm_seconds'] / warm_ref:.1f}× | "
            f"{m['extra_bytes'] / 2**20:.0f} | {m['extra_bytes'] / info['weight_bytes']:.2f}× | "
            f"{'-' if pruned is None else f'{pruned:,}'} |"
        )
    pk_m, torch_m = med["prunekit"], med["torch_prune"]
    text = rf"""# Global magnitude pruning of ResNet-50 to 90%

Machine: {machine()}. Date: {today()}.
Command: `python benchmarks/global_magnitude_resnet50.py` (each row: median of {args.repeats} fresh processes).

torchvision ResNet-50 (random weights), {info["weights"]:,} Conv/Linear weights, {info["weight_bytes"] / 2**20:.0f} MiB.
Target: prune {expected_pruned:,} weights (90%) by one global |w| threshold.

"First call" is the call a user makes: the first in a fresh process, on a freshly built model (memory
not yet touched by earlier work). "Repeated" is the median of later calls in the same process, each on a
fresh model (warm allocator and caches; for the reference, the same pass again). Ratios compare like
with like.

| method | first call (ms) | × first \|w\| pass | repeated (ms) | × repeated \|w\| pass | extra peak memory (MiB) | × weights' bytes | weights at zero after |
|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

- prunekit vs torch.nn.utils.prune: **{torch_m["cold_seconds"] / pk_m["cold_seconds"]:.0f}× faster** on the first call,
  **{torch_m["extra_bytes"] / max(pk_m["extra_bytes"], 1):.0f}× less extra memory**; both prune exactly {expected_pruned:,} weights.
- Targets (issue #2): ≤ 10× the |w| pass → {pk_m["cold_seconds"] / cold_ref:.1f}× (first call) /
  {pk_m["warm_seconds"] / warm_ref:.1f}× (repeated); ≤ 0.5× the weights' bytes of extra peak memory →
  {pk_m["extra_bytes"] / info["weight_bytes"]:.2f}×.
- prunekit's extra memory includes its bit-packed masks (1 bit per weight) kept on the model;
  torch.nn.utils.prune keeps `weight_orig` and a float `weight_mask` per layer (2 extra copies).
- "Extra peak memory" is the rise of the process's resident high-water mark over the first call
  (`/proc/self/status` VmHWM after resetting it), so it counts every temporary.
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
    left.bar(labels, [med[k]["cold_seconds"] * 1e3 for k in keys], color=["#999", "#2a7", "#c55"])
    left.set_ylabel("time of the first call (ms)")
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
