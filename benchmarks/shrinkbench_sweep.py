"""A ShrinkBench-style sweep (Blalock et al. 2020, "What is the State of Neural Network Pruning?") on MNIST.

Five methods (global / layerwise magnitude, global / layerwise gradient magnitude |w·∂L/∂w|, random)
prune copies of the same dense model one-shot to compressions 1–64× and fine-tune each with the
same fixed budget; 3 seeds. The output layer is left dense and out of the count, as in ShrinkBench:
compression = total / non-zero weights of the pruned layers. Also compares Zhu & Gupta 2017's gradual
(cubic) schedule with one-shot pruning at 16×, within the same fine-tuning budget.

Run:  python benchmarks/shrinkbench_sweep.py            (full: LeNet-300-100, 3 seeds)
      python benchmarks/shrinkbench_sweep.py --quick    (2 seeds, shorter training: about 1 minute)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    describe_training,
    mean_std,
    single_thread_machine,
    study_main,
    today,
    training_config,
)

from prunekit import bench  # noqa: E402
from prunekit.bench.results import require_matplotlib  # noqa: E402

STUDY = "shrinkbench_sweep"
GRADUAL = "global magnitude, gradual (cubic)"
ONE_SHOT_LABEL = "global magnitude"


@dataclass(frozen=True)
class Protocol:
    """Budgets in epochs of the training images; ``models`` maps a model to (pretrain, fine-tune) epochs."""

    seeds: tuple[int, ...]
    models: dict
    compressions: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)
    methods: tuple[str, ...] = tuple(m.name for m in bench.SHRINKBENCH_METHODS)
    gradual: bool = True


PROTOCOLS = {
    "full": Protocol((0, 1, 2), {"lenet-300-100": (30, 10)}),
    "quick": Protocol((0, 1), {"lenet-300-100": (15, 3)}),
    # The smallest form, for CI: the two methods whose order the test checks, at 16×.
    "ci": Protocol(
        (0,), {"lenet-300-100": (6, 2)}, compressions=(16,), methods=("global magnitude", "random"), gradual=False
    ),
}


def methods(protocol: Protocol) -> list[bench.Method]:
    chosen = [m for m in bench.SHRINKBENCH_METHODS if m.name in protocol.methods]
    if protocol.gradual:
        chosen.append(bench.Method(GRADUAL, "magnitude", "global", "gradual", compressions=(16,)))
    return chosen


def run(protocol: Protocol, split, progress: bool = True) -> dict[str, bench.SweepResult]:
    results = {}
    for model, (pretrain, finetune) in protocol.models.items():
        factory, output_layer = bench.MODELS[model]
        config = training_config(model, pretrain)
        results[model] = bench.sweep(
            factory,
            split,
            methods(protocol),
            protocol.compressions,
            pretrain=config,
            finetune=config.scaled(finetune),
            seeds=protocol.seeds,
            exclude=[output_layer],
            progress=progress,
        )
    return results


def mean_accuracy(result: bench.SweepResult, method: str, point: float) -> float | None:
    values = [r["accuracy"] for r in result.rows if r["method"] == method and r["point"] == point]
    return sum(values) / len(values) if values else None


def ordering_rows(result: bench.SweepResult) -> list[str]:
    """Table rows: at each compression ≥ 8×, global − layerwise and layerwise − random, in points."""
    rows = []
    for point in [p for p in result.points if p >= 8]:
        acc = {m: mean_accuracy(result, m, point) for m in result.methods}
        if None in (acc.get("global magnitude"), acc.get("layerwise magnitude"), acc.get("random")):
            continue
        g, lw, rnd = acc["global magnitude"], acc["layerwise magnitude"], acc["random"]
        grad = [acc.get("global gradient magnitude"), acc.get("layerwise gradient magnitude")]
        grad_cell = " / ".join(f"{100 * v:.2f}" for v in grad if v is not None)
        holds = g >= lw and lw - rnd >= 0.01
        rows.append(
            f"| {point:g}× | {100 * (g - lw):+.2f} | {100 * (lw - rnd):+.2f} | {grad_cell} | {'yes' if holds else 'no'} |"
        )
    return rows


def report(results, protocol: Protocol, mode: str, split, seconds: float, name: str = STUDY) -> str:
    command = f"python benchmarks/{STUDY}.py" + (" --quick" if mode == "quick" else "")
    seeds = len(protocol.seeds)
    lines = [
        "# ShrinkBench-style sweep on MNIST: five pruning methods, compression 1–64×",
        "",
        f"Machine: {single_thread_machine()}. Date: {today()}. Wall time: {seconds / 60:.1f} min.",
        f"Command: `{command}`. Data: {split.description}. Raw numbers: `{name}.json`.",
        "",
        "Accuracy (%) on the 2,000 evaluation images after pruning and fine-tuning, mean ± std over "
        f"{seeds} seed{'s' * (seeds > 1)} (initialisation and batch order; the split is fixed). Compression = "
        "total / non-zero weights of the pruned layers (all Linear/Conv layers but the output layer, which "
        "stays dense, as in ShrinkBench). At 1× the dense model is fine-tuned with the same budget.",
        "",
        "Paper (Blalock et al. 2020, on CIFAR-10 and ImageNet networks; no MNIST numbers): global magnitude is "
        "the strongest simple baseline at high compression, ahead of layerwise magnitude, and random pruning "
        "falls far behind. Expected here: global ≥ layerwise ≫ random at ≥ 8×.",
        "",
    ]
    for model, result in results.items():
        pretrain, finetune = result.settings["pretrain"], result.settings["finetune"]
        lines += [
            f"## {model}",
            "",
            f"Dense training: {describe_training(bench.TrainConfig(**pretrain))}. Fine-tuning budget after "
            f"pruning (every method, every compression): {describe_training(bench.TrainConfig(**finetune))}, "
            "the learning-rate schedule restarted. Gradient-magnitude scores are summed over 8 training "
            "batches of 64.",
            "",
            result.to_markdown(),
            "",
            "Ordering at ≥ 8× (differences of mean accuracy, points):",
            "",
            "| compression | global − layerwise magnitude | layerwise magnitude − random | global / layerwise gradient (%) | global ≥ layerwise ≫ random (≥ 1 point) |",
            "|---:|---:|---:|---|---|",
            *ordering_rows(result),
            "",
        ]
        if GRADUAL in result.methods:
            one = [r for r in result.rows if r["method"] == ONE_SHOT_LABEL and r["point"] == 16]
            gradual = [r for r in result.rows if r["method"] == GRADUAL and r["point"] == 16]
            lines += [
                "Gradual vs one-shot at 16× (global magnitude, same fine-tuning budget): one-shot then fine-tune "
                f"{mean_std([r['accuracy'] for r in one])}%, one-shot before fine-tuning "
                f"{mean_std([r['accuracy_before_finetune'] for r in one])}%; gradual (Zhu & Gupta's cubic from 0 "
                f"to 16× over the first 75% of the budget, 20 pruning steps, then fine-tuning) "
                f"{mean_std([r['accuracy'] for r in gradual])}%.",
                "",
            ]
    lines += [
        f"![accuracy against compression]({name}.png)",
        "",
        "## How this protocol differs from ShrinkBench's",
        "",
        "- Data and models: ShrinkBench reports CIFAR-10 (ResNet-56, VGG) and ImageNet (ResNet-18, ...); here "
        f"{' and '.join(results)} on an 8,000/2,000 split of MNIST's test set (the training set is not available "
        "offline). One evaluation image is 0.05 points; differences smaller than the seed-to-seed standard "
        "deviations in the tables are not resolved by this many seeds.",
        "- ShrinkBench's compression counts all parameters of the model; here it counts the pruned layers' weights "
        "(the issue's definition); the `model_compression` column of the JSON gives the whole-model figure "
        "(biases and the dense output layer included), lower at high compression.",
        "- Short fixed fine-tuning budgets (above) instead of ShrinkBench's longer ones; gradient scores from 8 "
        "batches rather than one pass over a batch of the training set.",
    ]
    return "\n".join(lines) + "\n"


def plot(results, path: Path) -> None:
    Figure = require_matplotlib()
    fig = Figure(figsize=(6.5 * len(results), 5), dpi=120, layout="constrained")
    for ax, (model, result) in zip(fig.subplots(1, len(results), squeeze=False)[0], results.items()):
        result.plot(
            title=f"{model}, output layer dense, fixed fine-tuning budget, {len(result.dense)} seed(s)",
            ax=ax,
            methods=[m for m in result.methods if m != GRADUAL],
        )
    fig.suptitle("ShrinkBench-style sweep on MNIST (8,000 training / 2,000 evaluation images)", fontsize=10)
    fig.savefig(path)


if __name__ == "__main__":
    study_main(__doc__, STUDY, PROTOCOLS, run, report, plot)
