"""Structured pruning of torchvision's ResNet-50 at 50% of channels: size, MACs, latency, tracing time.

Compares, in the same run and on the same machine, the dense model with

- prunekit: ``pk.prune(model, 0.5, criterion="l2", granularity="out_channel", scope="local",
  example_inputs=x)`` then ``pk.compact(model, x)``;
- Torch-Pruning (the reference): ``tp.pruner.MetaPruner(model, x, GroupMagnitudeImportance(p=2),
  pruning_ratio=0.5, ignored_layers=[model.fc])`` then ``pruner.step()``.

Both keep the classifier's 1000 outputs and prune every coupled channel group to half. Latency is the
median over repeated forward passes of a batch of 8 at 224×224 in eval mode (``torch.no_grad``),
after warm-up; each model is timed in turn, several rounds interleaved, so machine noise hits all
alike. Target (issue #4): latency speed-up at least 0.8 of the MAC reduction; tracing and pruning no
slower than Torch-Pruning.

Run:  python benchmarks/structured_resnet50.py        (needs torchvision and torch-pruning; ~3 minutes)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, today, write_result  # noqa: E402

import prunekit as pk  # noqa: E402


def _model():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


def _median_seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _prunekit(x):
    model = _model()
    deps = pk.trace_dependencies(model, x, reuse=False)
    trace_s = _median_seconds(lambda: pk.trace_dependencies(model, x, reuse=False))
    model = _model()  # a fresh model: the timed prune traces it (compact then reuses that trace)
    start = time.perf_counter()
    pk.prune(model, 0.5, criterion="l2", granularity="out_channel", scope="local", example_inputs=x).remove()
    small = pk.compact(model, x, inplace=True, check=False)
    total_s = time.perf_counter() - start
    return small, trace_s, total_s, deps.num_units


def _torch_pruning(x):
    import torch_pruning as tp

    model = _model()
    trace_s = _median_seconds(lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x))
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[model.fc]
    )
    pruner.step()
    total_s = time.perf_counter() - start
    return model, trace_s, total_s


def _latency(models: dict, batch: torch.Tensor, rounds: int, repeats: int) -> dict[str, float]:
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(2):
                model(batch)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(repeats):
                    model(batch)
                times[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    x = torch.randn(1, 3, 224, 224)
    dense = _model()
    with torch.no_grad():  # warm up torch (allocator, kernels) so neither method pays the first call
        for _ in range(3):
            dense(x)
    ours, our_trace, our_total, units = _prunekit(x)
    theirs, their_trace, their_total = _torch_pruning(x)
    models = {"dense": dense, "prunekit": ours, "Torch-Pruning": theirs}
    stats = {name: pk.summary(model, example_inputs=x) for name, model in models.items()}
    latency = _latency(models, torch.randn(8, 3, 224, 224), args.rounds, args.repeats)

    rows = []
    for name in models:
        mac_speedup = stats["dense"].macs / stats[name].macs
        speedup = latency["dense"] / latency[name]
        rows.append(
            f"| {name} | {stats[name].total_params / 1e6:.2f} M | {stats[name].macs / 1e9:.2f} G | "
            f"{latency[name] * 1e3:.0f} ms | {mac_speedup:.2f}× | {speedup:.2f}× | {speedup / mac_speedup:.2f} |"
        )
    text = f"""# Structured pruning of ResNet-50 at 50% of channels

Machine: {machine()}. Date: {today()}. Command: `python benchmarks/structured_resnet50.py`.

torchvision ResNet-50 with random weights; every coupled channel group pruned to half by L2 norm
(prunekit `scope="local"`, Torch-Pruning `pruning_ratio=0.5`), classifier outputs kept. Latency:
median of {args.rounds} rounds × {args.repeats} forward passes, batch 8 at 224×224, eval mode, no grad.

| model | parameters | MACs | latency | MAC reduction | latency speed-up | speed-up / MAC reduction |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Target: speed-up / MAC reduction ≥ 0.8 for prunekit's compacted model.

| step | prunekit | Torch-Pruning | ratio (prunekit / Torch-Pruning) |
|---|---|---|---|
| trace dependencies (1×3×224×224, median of 3) | {our_trace:.2f} s | {their_trace:.2f} s | {our_trace / their_trace:.2f} |
| prune + compact (one call each, traces included) | {our_total:.2f} s | {their_total:.2f} s | {our_total / their_total:.2f} |

prunekit found {units} removable channel groups.
"""
    path = write_result("structured_resnet50", text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
