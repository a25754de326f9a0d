"""Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks", on MNIST.

LeNet-300-100 and LeNet-5 (Caffe variant) are trained dense, then pruned to 12× (8% of the weights
kept) by magnitude in two ways: with the paper's per-layer keep ratios, and with one global
threshold; each either iteratively with retraining (Han et al.'s method: prune, retrain, repeat)
or one-shot without any retraining. Global magnitude is then pushed to higher compressions to find
the largest one that stays within 0.5 points of the dense accuracy.

Compression here is Han's: total / non-zero **weights** of all Linear and Conv layers, output layer
included (biases, 0.1–0.2% of the parameters, are not pruned and not counted).

Run:  python benchmarks/han_mnist.py            (full: 3 seeds, both models)
      python benchmarks/han_mnist.py --quick    (1 seed, shorter training: a few minutes)
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

STUDY = "han_mnist"

#: Han et al. 2015, Table 1 and Tables 2–3 (error rates in percent, kept fractions per layer).
PAPER = {
    "lenet-300-100": {
        "dense_error": 1.64,
        "pruned_error": 1.59,
        "compression": 12,
        "keep": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26},
    },
    "lenet-5": {
        "dense_error": 0.80,
        "pruned_error": 0.77,
        "compression": 12,
        "keep": {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19},
    },
}

PAPER_ITERATIVE = "paper's per-layer ratios, iterative + retraining"
PAPER_ONESHOT = "paper's per-layer ratios, one-shot, no retraining"
GLOBAL_ITERATIVE = "global magnitude, iterative + retraining"
GLOBAL_ONESHOT = "global magnitude, one-shot, no retraining"


@dataclass(frozen=True)
class Protocol:
    """One size of the study. Budgets are in epochs of the 8,000 training images."""

    seeds: tuple[int, ...]
    models: tuple[str, ...]
    pretrain: dict  # model -> TrainConfig
    retrain: dict  # model -> TrainConfig (shared by all rounds of one pruning run)
    rounds: int
    compressions: tuple[float, ...]  # global magnitude with retraining
    oneshot_compressions: tuple[float, ...]  # global magnitude without retraining


def _configs(lenet300_epochs: float, lenet5_epochs: float, lenet300_retrain: float, lenet5_retrain: float):
    pretrain = {"lenet-300-100": training_config("lenet-300-100", lenet300_epochs),
                "lenet-5": training_config("lenet-5", lenet5_epochs)}  # fmt: skip
    retrain = {"lenet-300-100": pretrain["lenet-300-100"].scaled(lenet300_retrain),
               "lenet-5": pretrain["lenet-5"].scaled(lenet5_retrain)}  # fmt: skip
    return pretrain, retrain


PROTOCOLS = {
    "full": Protocol(
        (0, 1, 2),
        ("lenet-300-100", "lenet-5"),
        *_configs(30, 15, 40, 8),
        rounds=4,
        compressions=(12, 16, 24, 32, 48, 64),
        oneshot_compressions=(2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
    ),
    "quick": Protocol(
        (0,),
        ("lenet-300-100", "lenet-5"),
        *_configs(15, 4, 12, 2),
        rounds=3,
        compressions=(12, 24),
        oneshot_compressions=(2, 4, 8, 12),
    ),
    # The smallest form, for CI: LeNet-300-100 only, one seed.
    "ci": Protocol(
        (0,),
        ("lenet-300-100",),
        *_configs(6, 2, 6, 2),
        rounds=3,
        compressions=(12,),
        oneshot_compressions=(12,),
    ),
}


def paper_sparsity(model: str) -> dict[str, float]:
    return {name: 1.0 - keep for name, keep in PAPER[model]["keep"].items()}


def methods(model: str, protocol: Protocol) -> list[bench.Method]:
    layers = paper_sparsity(model)
    return [
        bench.Method(PAPER_ITERATIVE, "magnitude", "local", "iterative", rounds=protocol.rounds,
                     layer_sparsity=layers, compressions=(12,)),
        bench.Method(PAPER_ONESHOT, "magnitude", "local", finetune=False, layer_sparsity=layers, compressions=(12,)),
        bench.Method(GLOBAL_ITERATIVE, "magnitude", "global", "iterative", rounds=protocol.rounds,
                     compressions=protocol.compressions),
        bench.Method(GLOBAL_ONESHOT, "magnitude", "global", finetune=False,
                     compressions=protocol.oneshot_compressions),
    ]  # fmt: skip


def run(protocol: Protocol, split, progress: bool = True) -> dict[str, bench.SweepResult]:
    """One :class:`prunekit.bench.SweepResult` per model."""
    results = {}
    for model in protocol.models:
        factory, _ = bench.MODELS[model]
        every = sorted({12, *protocol.compressions, *protocol.oneshot_compressions})
        results[model] = bench.sweep(
            factory,
            split,
            methods(model, protocol),
            every,
            pretrain=protocol.pretrain[model],
            finetune=protocol.retrain[model],
            seeds=protocol.seeds,
            progress=progress,
        )
    return results


def _rows(result: bench.SweepResult, method: str, point: float) -> list[dict]:
    return [r for r in result.rows if r["method"] == method and r["point"] == point]


def _delta(result: bench.SweepResult, rows: list[dict]) -> float:
    """Mean accuracy change against the dense mean, in percentage points."""
    dense, _ = result.dense_accuracy()
    return 100 * (sum(r["accuracy"] for r in rows) / len(rows) - dense)


def report(
    results: dict[str, bench.SweepResult], protocol: Protocol, mode: str, split, seconds: float, name: str = STUDY
) -> str:
    seeds = len(protocol.seeds)
    command = f"python benchmarks/{STUDY}.py" + (" --quick" if mode == "quick" else "")
    lines = [
        "# Han et al. 2015 on MNIST: magnitude pruning with and without retraining",
        "",
        f"Machine: {single_thread_machine()}. Date: {today()}. Wall time: {seconds / 60:.1f} min.",
        f"Command: `{command}`. Data: {split.description}. Raw numbers: `{name}.json`.",
        "",
        "## 12× (8% of the weights kept)",
        "",
        f"Accuracy on the 2,000 evaluation images, mean ± std over {seeds} seed{'s' * (seeds > 1)} "
        "(seeds change the initialisation and the batch order, not the split). Error = 100 − accuracy.",
        "",
        "| model | method | compression | accuracy (%) | change vs dense (points) | paper: error dense → pruned (%) |",
        "|---|---|---:|---:|---:|---|",
    ]
    verdicts = []
    for model, result in results.items():
        dense_rows = result.dense
        paper = PAPER[model]
        lines.append(
            f"| {model} | dense | 1× | {mean_std([r['accuracy'] for r in dense_rows])} | | {paper['dense_error']:.2f} |"
        )
        for method in (PAPER_ITERATIVE, GLOBAL_ITERATIVE, PAPER_ONESHOT, GLOBAL_ONESHOT):
            rows = _rows(result, method, 12)
            if not rows:
                continue
            compression = sum(r["compression"] for r in rows) / len(rows)
            paper_cell = (
                f"{paper['dense_error']:.2f} → {paper['pruned_error']:.2f} (12×)" if method == PAPER_ITERATIVE else ""
            )
            lines.append(
                f"| {model} | {method} | {compression:.1f}× | {mean_std([r['accuracy'] for r in rows])} | "
                f"{_delta(result, rows):+.2f} | {paper_cell} |"
            )
        for method in (PAPER_ITERATIVE, GLOBAL_ITERATIVE):
            delta = _delta(result, _rows(result, method, 12))
            verdicts.append(
                f"- {model}, {method}: {delta:+.2f} points at 12× — target (within 0.2 points of dense) "
                f"**{'met' if delta >= -0.2 - 1e-9 else 'missed'}**."
            )
        best = result.best_within(0.5, GLOBAL_ITERATIVE)
        tried = max(protocol.compressions)
        if best is None:
            verdicts.append(f"- {model}: no compression tried (12× to {tried:g}×) stays within 0.5 points of dense.")
        else:
            verdicts.append(
                f"- {model}: largest compression within 0.5 points of dense, global magnitude + retraining: "
                f"**{best.compression:.0f}×** ({100 * best.accuracy:.2f}%, {_delta(result, _rows(result, GLOBAL_ITERATIVE, best.point)):+.2f} points; "
                f"compressions tried: {', '.join(f'{c:g}×' for c in protocol.compressions)})."
            )
        falls = [
            f"{point:g}× {_delta(result, rows):+.2f}"
            for point in sorted(protocol.oneshot_compressions)
            if point <= 12 and (rows := _rows(result, GLOBAL_ONESHOT, point))
        ]
        verdicts.append(
            f"- {model}, global magnitude one-shot without retraining (paper: accuracy starts to fall at about 3×), "
            f"change vs dense in points: {', '.join(falls)}."
        )
    lines += ["", "## Targets", "", *verdicts, "", "## Accuracy against compression", ""]
    for model, result in results.items():
        lines += [f"### {model}", "", result.to_markdown(), ""]
        lines += [_paper_ratios(model), ""]
    lines += ["", f"![accuracy against compression]({name}.png)", "", *_settings(protocol), "", *_differences()]
    return "\n".join(lines) + "\n"


def _paper_ratios(model: str) -> str:
    keep = ", ".join(f"{name} {100 * k:.0f}%" for name, k in PAPER[model]["keep"].items())
    return f"The paper's per-layer keep ratios (final sparsity of the 'paper's per-layer ratios' rows): {keep}."


def _settings(protocol: Protocol) -> list[str]:
    lines = ["## Settings", ""]
    for model in protocol.models:
        pre, re = protocol.pretrain[model], protocol.retrain[model]
        lines.append(
            f"- {model}: dense training {describe_training(pre)}. Pruning with retraining: {protocol.rounds} rounds, each pruning the same "
            f"fraction of the remaining weights of every layer (paper ratios) or of all layers together (global), "
            f"then retraining {re.epochs / protocol.rounds:g} epochs with a fresh optimizer and the same cosine "
            f"learning-rate schedule ({re.epochs:g} epochs in all)."
        )
    lines.append(
        "- One-shot without retraining: the dense model pruned once and evaluated at once. "
        f"Seeds: {', '.join(map(str, protocol.seeds))}. All on one CPU thread."
    )
    return lines


def _differences() -> list[str]:
    return [
        "## How this protocol differs from the paper's",
        "",
        "- Data: the paper trains on MNIST's 60,000 training images and reports the 10,000 test images; the "
        "training set is not available offline here, so the test set is split (stratified, seed 0) into 8,000 "
        "training and 2,000 evaluation images. Dense accuracy is therefore lower than the paper's (about 97% "
        "instead of 98.4% for LeNet-300-100), and one evaluation image is 0.05 points: differences of a few "
        "tenths of a point are within the seed-to-seed spread.",
        "- Training: Caffe's SGD with its 'inv' learning-rate policy in the paper; here cosine-decayed SGD "
        "(LeNet-300-100) or Adam (LeNet-5), and far shorter budgets. The paper retrains at 1/10 of the original "
        "learning rate; with a schedule that decays to 0 that was worse here (a pilot run, LeNet-300-100 at 12×, "
        "seed 0, 4 rounds under one cosine schedule: 96.05% at lr/10 vs 96.95% at the full rate), so each retraining round restarts the cosine at the "
        "original rate (closer to Renda et al. 2020's learning-rate rewinding).",
        "- The paper prunes with a threshold of a quality parameter times each layer's weight standard deviation "
        "and iterates until the ratios in its tables; here the same final ratios are reached in a fixed number "
        "of rounds. Dropout is not used (the paper adjusts it while retraining).",
    ]


def plot(results: dict[str, bench.SweepResult], path: Path) -> None:
    Figure = require_matplotlib()
    fig = Figure(figsize=(6 * len(results), 4.8), dpi=120, layout="constrained")
    for ax, (model, result) in zip(fig.subplots(1, len(results), squeeze=False)[0], results.items()):
        dense, _ = result.dense_accuracy()
        result.plot(
            title=f"{model}: magnitude pruning (Han et al. 2015), {len(result.dense)} seed(s)",
            ax=ax,
            ylim=(max(0.0, 100 * dense - 8), min(100.0, 100 * dense + 1.5)),
        )
        ax.axvline(12, color="0.6", linewidth=0.8, linestyle="--")
    fig.suptitle(
        "MNIST, 8,000 training / 2,000 evaluation images (points below the frame: see the table)",
        fontsize=9,
    )
    fig.savefig(path)


if __name__ == "__main__":
    study_main(__doc__, STUDY, PROTOCOLS, run, report, plot)
