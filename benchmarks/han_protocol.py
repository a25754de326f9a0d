"""Which retraining detail moves Han et al.'s LeNet-300-100 result at 32× (issue 13).

The committed study (han_mnist.md) reports −0.23 points vs dense at 32× for global magnitude pruning
with retraining; an independent run "through the public API — dense SGD 30 epochs, then four
global-magnitude rounds of 10 epochs with a fresh optimizer and rewound learning rate" reported −0.62.
Here the committed protocol (:func:`prunekit.bench.prune_and_finetune`, as ``recipes/han_lenet300_32x.yaml``
runs it) is set beside variants that each change one detail, from the same dense model per seed:
how the learning rate behaves in each round, whether the optimizer (its momentum) is reset, the
batch order, weight decay. Every variant uses the public ``pk.Pruner`` with ``pk.Iterative(0, 3750, 4)``
and the hand loop below, which reproduces the committed protocol exactly (the row "hand loop").

Data and budgets are the committed study's: 8,000 / 2,000 images of MNIST's test set, dense SGD 30
epochs (lr 0.05, momentum 0.9, L2 5e-4, cosine to 0, batch 64), then 4 rounds × 10 epochs (1,250 steps).

Run:  python benchmarks/han_protocol.py [--seeds 0,1,2,3,4,5] [--compressions 12,32]
      python benchmarks/han_protocol.py --report-only      (rewrite the .md from the saved .json)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import MNIST_DIR, RESULTS, machine, today, training_config  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit import bench  # noqa: E402
from prunekit.data import benchmark_split  # noqa: E402

STUDY = "han_protocol"
BATCH, EPOCH_STEPS = 64, 125  # 8,000 images // 64
ROUND, DENSE, ROUNDS, LR = 10 * EPOCH_STEPS, 30 * EPOCH_STEPS, 4, 0.05
READING = "## Reading (written after this run)"
COMMITTED = "committed protocol (bench.prune_and_finetune)"


def cosine(t: int, total: int, lr: float = LR) -> float:
    return lr * 0.5 * (1 + math.cos(math.pi * t / total))


#: variant -> (lr of round r at step s, one optimizer for all rounds, new batch order each round, L2)
VARIANTS = {
    "hand loop (= committed)": (lambda r, s: cosine(s, ROUND), False, False, 5e-4),
    "lr: dense schedule's last 10 epochs each round (Renda et al. 2020 rewinding)": (
        lambda r, s: cosine(DENSE - ROUND + s, DENSE), False, False, 5e-4),
    "lr: one cosine over the 40 epochs (not restarted)": (lambda r, s: cosine(r * ROUND + s, ROUNDS * ROUND),
                                                           False, False, 5e-4),
    "lr: cosine restarted at lr/10 (the paper's 1/10)": (lambda r, s: cosine(s, ROUND, LR / 10), False, False, 5e-4),
    "lr: constant 0.05 in every round": (lambda r, s: LR, False, False, 5e-4),
    "one optimizer for all rounds (momentum kept)": (lambda r, s: cosine(s, ROUND), True, False, 5e-4),
    "new batch order each round": (lambda r, s: cosine(s, ROUND), False, True, 5e-4),
    "no weight decay while retraining": (lambda r, s: cosine(s, ROUND), False, False, 0.0),
}  # fmt: skip


def retrain(model, pruner, split, seed, lr_of, one_optimizer, reorder, weight_decay) -> None:
    """The committed retraining written out (bench.train's batch order and loss), one detail changeable."""
    optimizer, loss_fn = None, nn.CrossEntropyLoss()
    for r in range(ROUNDS):
        if optimizer is None or not one_optimizer:
            optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(seed + (1000 * r if reorder else 0))
        model.train()
        order = torch.randperm(len(split.y_train), generator=generator)
        for step in range(ROUND):
            position = (step % EPOCH_STEPS) * BATCH
            if step and position == 0:
                order = torch.randperm(len(split.y_train), generator=generator)
            index = order[position : position + BATCH]
            for group in optimizer.param_groups:
                group["lr"] = lr_of(r, step)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(split.x_train[index]), split.y_train[index]).backward()
            optimizer.step()
            pruner.step()
    model.eval()


def run(seeds, compressions, split, out: Path) -> list[dict]:
    rows = []
    pretrain, finetune = training_config("lenet-300-100", 30), training_config("lenet-300-100", 40)
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dense = bench.LeNet300100()
        bench.train(dense, split, pretrain, seed)
        rows.append({"variant": "dense", "seed": seed, "accuracy": bench.evaluate(dense, split.x_eval, split.y_eval)})
        for compression in compressions:
            method = bench.Method("global", "magnitude", "global", "iterative", rounds=ROUNDS)
            row = bench.prune_and_finetune(copy.deepcopy(dense), method, compression, split, finetune, seed)
            rows.append({"variant": COMMITTED, "compression": compression, "seed": seed, "accuracy": row["accuracy"]})
            for name, options in VARIANTS.items():
                model = copy.deepcopy(dense)
                pruner = pk.Pruner(model, 1 - 1 / compression, scope="global",
                                   schedule=pk.Iterative(0, (ROUNDS - 1) * ROUND, ROUNDS))  # fmt: skip
                pruner.prune()
                retrain(model, pruner, split, seed, *options)
                pruner.remove()
                accuracy = bench.evaluate(model, split.x_eval, split.y_eval)
                rows.append({"variant": name, "compression": compression, "seed": seed, "accuracy": accuracy})
            print(seed, compression, flush=True)
            out.write_text(json.dumps(rows, indent=1))
    return rows


def report(rows: list[dict], command: str) -> str:
    dense = {r["seed"]: r["accuracy"] for r in rows if r["variant"] == "dense"}
    mean_dense = statistics.fmean(dense.values())
    compressions = sorted({r["compression"] for r in rows if "compression" in r})
    lines = [
        "# Han et al. on LeNet-300-100: which retraining detail matters at 32× (issue 13)",
        "",
        f"Command: `{command}`. Date: {today()}. Machine: {machine()}; shared with other work (accuracies do "
        "not depend on it). Libraries: torch " + torch.__version__ + f", prunekit {pk.__version__}.",
        f"Seeds: {', '.join(map(str, sorted(dense)))}; dense accuracy {100 * mean_dense:.2f}% "
        f"(per seed: {', '.join(f'{100 * v:.2f}' for _, v in sorted(dense.items()))}). Change = mean over seeds of "
        "(pruned − dense of the same seed), percentage points, ± the sample std over seeds; one evaluation image "
        "is 0.05 points.",
        "",
        f"![change vs dense per variant]({STUDY}.png)",
        "",
        "| retraining (4 rounds × 10 epochs after dense SGD 30 epochs) | "
        + " | ".join(f"{c:g}×: accuracy (%) | {c:g}×: change (points)" for c in compressions)
        + " |",
        "|---|" + "---:|---:|" * len(compressions),
    ]
    for name in [COMMITTED, *VARIANTS]:
        cells = []
        for c in compressions:
            found = {r["seed"]: r["accuracy"] for r in rows if r["variant"] == name and r.get("compression") == c}
            changes = [100 * (a - dense[s]) for s, a in found.items()]
            spread = statistics.stdev(changes) if len(changes) > 1 else 0.0
            cells += [
                f"{100 * statistics.fmean(found.values()):.2f}",
                f"{statistics.fmean(changes):+.2f} ± {spread:.2f}",
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def changes(rows: list[dict], name: str, compression: float) -> list[float]:
    """Pruned − dense accuracy of the same seed, in percentage points, for one variant and compression."""
    dense = {r["seed"]: r["accuracy"] for r in rows if r["variant"] == "dense"}
    return [
        100 * (r["accuracy"] - dense[r["seed"]])
        for r in rows
        if r["variant"] == name and r.get("compression") == compression
    ]


def plot(rows: list[dict], path: Path) -> None:
    """Mean change vs dense (± the std over seeds) per retraining variant, one bar per compression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [COMMITTED, *VARIANTS]
    compressions = sorted({r["compression"] for r in rows if "compression" in r})
    fig, ax = plt.subplots(figsize=(12, 4.8))
    height = 0.8 / len(compressions)
    for k, c in enumerate(compressions):
        found = [changes(rows, name, c) for name in names]
        ax.barh(
            [i + k * height for i in range(len(names))],
            [statistics.fmean(v) for v in found],
            height,
            xerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in found],
            label=f"{c:g}×",
        )
    ax.set_yticks([i + height * (len(compressions) - 1) / 2 for i in range(len(names))], names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("change vs dense accuracy (points; mean ± std over seeds)")
    ax.legend()
    ax.set_title("Han et al. on LeNet-300-100: one retraining detail changed at a time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--compressions", default="12,32")
    parser.add_argument("--data", default=str(MNIST_DIR))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    raw = RESULTS / f"{STUDY}.json"
    command = (
        "python benchmarks/han_protocol.py"
        + (f" --seeds {args.seeds}" if args.seeds != "0,1,2,3,4,5" else "")
        + (f" --compressions {args.compressions}" if args.compressions != "12,32" else "")
    )
    if args.report_only:
        rows = json.loads(raw.read_text())
    else:
        split = benchmark_split(args.data)
        seeds = [int(s) for s in args.seeds.split(",")]
        rows = run(seeds, [float(c) for c in args.compressions.split(",")], split, raw)
    text = report(rows, command)
    path = RESULTS / f"{STUDY}.md"
    # The reading below the table is written by hand after a run; rewriting the table keeps it.
    old = path.read_text() if path.is_file() else ""
    reading = old[old.index(READING) :] if READING in old else ""
    path.write_text(text + ("\n" + reading if reading else ""))
    plot(rows, path.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
