"""Structured pruning across models and ratios, side by side with Torch-Pruning: parameters, MACs, latency.

For each torchvision model (random weights) and each channel ratio, both libraries prune every coupled
channel group by that fraction (L2 norm; prunekit ``scope="local"``, Torch-Pruning's MetaPruner with
``pruning_ratio``), keeping the classifier's outputs; then the dense model and both compacted models
are timed in turn, several rounds interleaved (batch 8 at 224×224, eval mode, no grad). Reported as
ratios to the dense model: MAC reduction, latency speed-up and their quotient (how much of the MAC
reduction the CPU turns into time).

Run:  python benchmarks/structured_models.py        (needs torchvision and torch-pruning; ~5 minutes)
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, interleaved_latency, machine, today, write_result  # noqa: E402

import prunekit as pk  # noqa: E402

MODELS = ("resnet50", "mobilenet_v2", "densenet121", "regnet_x_1_6gf")
RATIOS = (0.3, 0.5, 0.7)


def _model(name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def _classifier(model: torch.nn.Module) -> torch.nn.Module:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def _prunekit(model, x, ratio):
    pk.prune(model, ratio, criterion="l2", granularity="out_channel", scope="local", example_inputs=x).remove()
    return pk.compact(model, x, inplace=True)


def _torch_pruning(model, x, ratio):
    import torch_pruning as tp

    importance = tp.importance.GroupMagnitudeImportance(p=2)
    tp.pruner.MetaPruner(
        model, x, importance=importance, pruning_ratio=ratio, ignored_layers=[_classifier(model)]
    ).step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    x, batch = torch.randn(1, 3, 224, 224), torch.randn(8, 3, 224, 224)
    rows, points = [], []
    for name in MODELS:
        dense = _model(name)
        dense_stats = pk.summary(dense, example_inputs=x)
        for ratio in RATIOS:
            ours = _prunekit(copy.deepcopy(dense), x, ratio)
            theirs = _torch_pruning(copy.deepcopy(dense), x, ratio)
            models = {"dense": dense, "prunekit": ours, "Torch-Pruning": theirs}
            latency = interleaved_latency(models, batch, args.rounds, args.repeats)
            cells = []
            for library in ("prunekit", "Torch-Pruning"):
                stats = pk.summary(models[library], example_inputs=x)
                mac_reduction = dense_stats.macs / stats.macs
                speedup = latency["dense"] / latency[library]
                cells.append(
                    f"{stats.total_params / 1e6:.2f} M | {stats.macs / 1e9:.2f} G | {speedup:.2f}× | "
                    f"{speedup / mac_reduction:.2f}"
                )
                points.append((name, ratio, library, mac_reduction, speedup))
            rows.append(
                f"| {name} | {ratio:.0%} | {dense_stats.total_params / 1e6:.2f} M, {dense_stats.macs / 1e9:.2f} G, "
                f"{latency['dense'] * 1e3:.0f} ms | {' | '.join(cells)} |"
            )
            print(rows[-1], flush=True)
    text = f"""# Structured pruning across models and ratios, with Torch-Pruning

Machine: {machine()}. Date: {today()}. Command: `python benchmarks/structured_models.py`.

torchvision models with random weights; every coupled channel group pruned by the ratio (L2 norm;
prunekit `scope="local"` then `pk.compact`, Torch-Pruning `MetaPruner(pruning_ratio=...)`), classifier
outputs kept. Latency: batch 8 at 224×224, eval mode, no grad, median of {args.rounds} interleaved rounds
of {args.repeats} passes. "speed-up / MACs" is the latency speed-up divided by the MAC reduction.

| model | channel ratio | dense: params, MACs, latency | prunekit params | MACs | speed-up | speed-up / MACs | Torch-Pruning params | MACs | speed-up | speed-up / MACs |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Both libraries reach the same sizes (to within rounding) and the same speed-ups on ResNet-50, MobileNetV2
and DenseNet-121. On RegNetX, whose convs are grouped (16 channels per group), prunekit removes whole
groups (every group left keeps its 16 channels), while Torch-Pruning ends with fewer parameters and MACs
at the same ratio. The share of the MAC reduction that the CPU turns into time falls as layers get thin (70%):
small convolutions cost more per MAC. Each row times its three models in interleaved rounds; between rows
this virtual machine's speed drifts (the dense ResNet-50 took 268–312 ms in one run), so compare within
a row. [`structured_resnet50.md`](structured_resnet50.md) times ResNet-50 at 50% with more rounds.
"""
    path = write_result("structured_models", text)
    _plot(points, RESULTS / "structured_models.png")
    print(text)
    print(f"wrote {path}")


def _plot(points, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.5))
    markers = {name: marker for name, marker in zip(MODELS, "osD^")}
    for library, color in (("prunekit", "#2a7"), ("Torch-Pruning", "#c52")):
        for name in MODELS:
            chosen = [(m, s) for n, _, lib, m, s in points if n == name and lib == library]
            axis.scatter(*zip(*chosen), color=color, marker=markers[name], label=f"{library}, {name}", s=30)
    top = max(max(m, s) for *_, m, s in points)
    axis.plot([1, top], [1, top], color="#888", linestyle="--", linewidth=1, label="speed-up = MAC reduction")
    axis.set_xlabel("MAC reduction (×)")
    axis.set_ylabel("CPU latency speed-up (×), batch 8")
    axis.legend(fontsize=7)
    axis.set_title("Compacted torchvision models at 30/50/70% of channels")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
