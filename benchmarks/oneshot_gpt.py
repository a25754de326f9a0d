"""Calibrated one-shot pruning of a causal language model trained here: perplexity per method.

A byte-level GPT-2 (4 blocks, width 128, context 128; ``prunekit.bench.text_lm``) is trained on the
Python standard library's sources (no downloads), then pruned by magnitude (layer-wise |w|), Wanda and
SparseGPT at 50% unstructured and 2:4, and at 70% with and without OWL. Only the blocks' Linear layers
are pruned (embeddings and the tied LM head stay dense), as in the papers. Perplexity over
non-overlapping windows of 128 bytes of held-out files, beside the published LLaMA-2-7B / WikiText-2
numbers (Sun et al. 2023, Table 2-3; Frantar & Alistarh 2023).

Run:  python benchmarks/oneshot_gpt.py [--owl-grid] [--cache FILE] [--layers N --width N --steps N]
(needs transformers). The default run writes results/oneshot_gpt.md and its plot. ``--owl-grid`` trains the
same model and runs only Wanda and SparseGPT at 70%: uniform and ``layer_sparsity=pk.OWL(M, λ)`` for
M ∈ {3, 5, 7} × λ ∈ {0.02, 0.05, 0.08} (the paper's M = 5, λ = 0.08 among them), with the block sparsities
OWL chose (results/oneshot_gpt_owl.md and .png). ``--cache FILE`` trains once for both: it saves the
trained model to FILE (a pickle: only load files you wrote), or loads it when FILE exists.
``--layers/--width/--steps`` train another model (files ``oneshot_gpt[_owl]_w<width>_l<layers>_s<steps>``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata as md
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine, today, write_result  # noqa: E402
from _owl_grid import PAPER, block_sparsities, grid_rows, plot_grid  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.bench.text_lm import (  # noqa: E402
    TinyLMConfig,
    byte_tokens,
    calibration_windows,
    stdlib_files,
    train_tiny_lm,
)

TRAIN_FILES, EVAL_FILES = (0, 100), (120, 20)
CONFIG = TinyLMConfig(layers=4, width=128, heads=4, context=128, batch=16, steps=1000, lr=3e-3)
CALIBRATION, EVAL_WINDOWS = 128, 128
SETTINGS = {
    "50%": dict(sparsity=0.5),
    "2:4": dict(granularity=pk.NM(2, 4)),
    "70%": dict(sparsity=0.7),
}
METHODS = ("magnitude", "wanda", "sparsegpt", "wanda+owl", "sparsegpt+owl")
#: LLaMA-2-7B, WikiText-2 (dense 5.12), as published.
PUBLISHED = {
    ("50%", "magnitude"): 14.89,
    ("50%", "sparsegpt"): 6.51,
    ("50%", "wanda"): 6.42,
    ("2:4", "magnitude"): 54.59,
    ("2:4", "sparsegpt"): 10.17,
    ("2:4", "wanda"): 11.02,
}
BLOCKS = r"transformer\.h\..*"
OWL_SPARSITY, OWL_CRITERIA = 0.7, ("wanda", "sparsegpt")
OWL_MULTIPLIERS, OWL_SPREADS = (3.0, 5.0, 7.0), (0.02, 0.05, 0.08)


def trained_model(train, config: TinyLMConfig, cache: str | None):
    """The model trained on ``train`` with ``config`` and its training time in seconds (None when loaded
    from ``cache``, the whole model a previous run with the same config pickled there)."""
    if cache and Path(cache).exists():
        saved = torch.load(cache, weights_only=False)
        if saved["config"] != dataclasses.asdict(config):
            raise SystemExit(f"--cache {cache} holds a model trained with {saved['config']}, not {config}")
        return saved["model"].eval(), None
    started = time.perf_counter()
    model = train_tiny_lm(train, config)
    trained = time.perf_counter() - started
    if cache:
        torch.save({"config": dataclasses.asdict(config), "model": model}, cache)
    return model, trained


def prune(model, method, setting, calibration):
    criterion = method.split("+")[0]
    options = dict(SETTINGS[setting], criterion=criterion)
    if method.endswith("+owl"):
        options["layer_sparsity"] = "owl"
    if criterion == "magnitude":
        return pk.prune(model, include=[BLOCKS], **options)
    return pk.prune(model, calibration=calibration, progress=False, **options)


def plot(ppl: dict, dense: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        points = [(j, ppl[(s, method)]) for j, s in enumerate(SETTINGS) if (s, method) in ppl]
        ax.bar([j + i * width for j, _ in points], [v / dense for _, v in points], width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SETTINGS))], list(SETTINGS))
    ax.set_ylabel("perplexity / dense perplexity")
    ax.set_yscale("log")
    ax.set_title("byte-level GPT-2 trained on the stdlib, one-shot pruning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_settings(model, calibration, held_out, settings) -> tuple[dict, dict]:
    """Perplexity and pruning seconds of every method at each of ``settings`` (OWL at 70% only)."""
    ppl, seconds = {}, {}
    for setting in settings:
        for method in METHODS:
            if setting != "70%" and method.endswith("owl"):
                continue
            pruned = copy.deepcopy(model)
            start = time.perf_counter()
            prune(pruned, method, setting, calibration)
            seconds[(setting, method)] = time.perf_counter() - start
            ppl[(setting, method)] = pk.perplexity(pruned, held_out, window=CONFIG.context, batch_size=16)
            print(setting, method, f"{ppl[(setting, method)]:.3f}", flush=True)
    return ppl, seconds


def settings_table(ppl: dict, seconds: dict, dense: float) -> list[str]:
    lines = [
        "| sparsity | method | perplexity | × dense | LLaMA-2-7B published (dense 5.12) | × dense | prune s |",
        "|---|---|---|---|---|---|---|",
    ]
    for (setting, method), value in ppl.items():
        published = PUBLISHED.get((setting, method))
        pub = f"{published:.2f} | {published / 5.12:.2f}" if published else "— | —"
        lines.append(
            f"| {setting} | {method} | {value:.3f} | {value / dense:.3f} | {pub} | {seconds[(setting, method)]:.1f} |"
        )
    return lines + [
        "",
        "OWL at 70% on LLaMA-1-7B (published): Wanda 85.77 → 24.55, SparseGPT 26.30 → 19.49 (dense 5.68).",
    ]


def owl_grid_rows() -> list[tuple[str, object]]:
    """(label, layer_sparsity): uniform, then the (M, λ) grid (the paper's values are in it, run once)."""
    return [("uniform", None)] + grid_rows(OWL_MULTIPLIERS, OWL_SPREADS)


def shown(label: str, layer_sparsity) -> str:
    paper = layer_sparsity is not None and (layer_sparsity.outlier_multiplier, layer_sparsity.spread) == PAPER
    return f"**{label} (paper)**" if paper else label


def run_owl_grid(model, calibration, held_out, dense: float, plot_path: Path) -> list[str]:
    """Wanda and SparseGPT at OWL_SPARSITY, uniform and over the (M, λ) grid: table lines; draws the plot."""
    ppl, reports = {}, {}
    for label, layer_sparsity in owl_grid_rows():
        for criterion in OWL_CRITERIA:
            pruned = copy.deepcopy(model)
            options = {} if layer_sparsity is None else {"layer_sparsity": layer_sparsity}
            pruner = pk.prune(
                pruned, sparsity=OWL_SPARSITY, criterion=criterion, calibration=calibration, progress=False, **options
            )
            reports[(label, criterion)] = pruner.calibration_report
            ppl[(label, criterion)] = pk.perplexity(pruned, held_out, window=CONFIG.context, batch_size=16)
            print(label, criterion, f"{ppl[(label, criterion)]:.3f}", block_sparsities(pruner.calibration_report))
    blocks = f"blocks 0–{len(block_sparsities(reports[('uniform', 'wanda')]).split()) - 1}"
    lines = [
        f"| layer sparsities | wanda | × dense | sparsegpt | × dense | block sparsities chosen ({blocks}) |",
        "|---|---|---|---|---|---|",
    ]
    for label, layer_sparsity in owl_grid_rows():
        wanda, sparsegpt = ppl[(label, "wanda")], ppl[(label, "sparsegpt")]
        chosen, other = (block_sparsities(reports[(label, c)]) for c in OWL_CRITERIA)
        chosen += "" if other == chosen else f" (wanda; sparsegpt: {other})"
        lines.append(
            f"| {shown(label, layer_sparsity)} | {wanda:.3f} | {wanda / dense:.3f} | "
            f"{sparsegpt:.3f} | {sparsegpt / dense:.3f} | {chosen} |"
        )
    reached = ", ".join(
        f"{label} {c} {reports[(label, c)].overall_sparsity:.4f}" for label, _ in owl_grid_rows() for c in OWL_CRITERIA
    )
    plot_grid(
        ppl,
        OWL_MULTIPLIERS,
        OWL_SPREADS,
        OWL_CRITERIA,
        plot_path,
        "perplexity (bytes)",
        "OWL on the byte-level GPT-2 trained here (lower is better)",
        OWL_SPARSITY,
    )
    return lines + [
        "",
        f"Reached sparsity of the pruned layers: {reached}.",
        "OWL at 70% on LLaMA-1-7B (published): Wanda 85.77 → 24.55, SparseGPT 26.30 → 19.49 (dense 5.68).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--owl-grid",
        action="store_true",
        help="only Wanda / SparseGPT at 70%%: uniform and OWL over the (M, λ) grid (results/oneshot_gpt_owl.md)",
    )
    parser.add_argument(
        "--cache",
        metavar="FILE",
        help="load the trained model from FILE if it exists, else train and save it there "
        "(to run the full benchmark and another mode on one trained model; not a result)",
    )
    parser.add_argument("--layers", type=int, default=CONFIG.layers, help="blocks (default: %(default)s)")
    parser.add_argument("--width", type=int, default=CONFIG.width, help="model width (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=CONFIG.steps, help="training steps (default: %(default)s)")
    args = parser.parse_args()
    config = dataclasses.replace(CONFIG, layers=args.layers, width=args.width, steps=args.steps)
    # another model writes its own files: oneshot_gpt[_owl]_w<width>_l<layers>_s<steps>.md
    name = "oneshot_gpt" + ("_owl" if args.owl_grid else "")
    name += "" if config == CONFIG else f"_w{config.width}_l{config.layers}_s{config.steps}"
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    started = time.perf_counter()
    train_files, eval_files = stdlib_files(*TRAIN_FILES), stdlib_files(*EVAL_FILES)
    train = byte_tokens(train_files)
    held_out = byte_tokens(eval_files, EVAL_WINDOWS * CONFIG.context)
    model, trained = trained_model(train, config, args.cache)
    calibration = calibration_windows(train, CALIBRATION, CONFIG.context, 16, seed=1)
    dense = pk.perplexity(model, held_out, window=CONFIG.context, batch_size=16)
    took = "loaded from --cache" if trained is None else f"trained in {trained:.0f} s"
    print("dense", dense, took, flush=True)
    if args.owl_grid:
        table = run_owl_grid(model, calibration, held_out, dense, RESULTS / f"{name}.png")
    else:
        ppl, seconds = run_settings(model, calibration, held_out, SETTINGS)
        table = settings_table(ppl, seconds, dense)
    total = time.perf_counter() - started
    libs = ", ".join(f"{n} {md.version(n)}" for n in ("torch", "transformers", "prunekit"))
    title = "OWL's options on" if args.owl_grid else "Calibrated one-shot pruning of"
    lines = [
        f"# {title} a causal LM trained here (benchmarks/oneshot_gpt.py{' --owl-grid' if args.owl_grid else ''})",
        "",
        f"{today()}; {machine()}; shared with other work. Libraries: {libs}.",
        f"Model: byte-level GPT-2 (vocab 256), {config.layers} blocks, width {config.width}, {config.heads} heads, "
        f"context {CONFIG.context}; trained {config.steps} steps × {CONFIG.batch} windows of {CONFIG.context} bytes, "
        f"AdamW lr {CONFIG.lr:g} (warm-up, cosine), seed {CONFIG.seed}, on stdlib_files{TRAIN_FILES} "
        f"({train_files[0].name} … {train_files[-1].name}, {train.numel()} bytes); {took}.",
        f"Calibration: {CALIBRATION} random windows of {CONFIG.context} bytes from the training files (seed 1), "
        f"batches of 16. Evaluation: the first {EVAL_WINDOWS} non-overlapping windows of {CONFIG.context} bytes of "
        f"stdlib_files{EVAL_FILES} ({eval_files[0].name} … {eval_files[-1].name}), disjoint from training.",
        f"Pruned: the {4 * config.layers} Linear (Conv1D) layers of the blocks; magnitude is layer-wise |w|; "
        "Wanda and SparseGPT with their defaults (Wanda one calibration pass per block, SparseGPT sequential).",
        "",
        f"Dense perplexity: **{dense:.3f}** (bytes).",
        "",
    ]
    if args.owl_grid:
        lines += [
            f"{OWL_SPARSITY:.0%} unstructured, uniform and `layer_sparsity=pk.OWL(outlier_multiplier=M, spread=λ)` for "
            f"M ∈ {{{', '.join(f'{m:g}' for m in OWL_MULTIPLIERS)}}} × λ ∈ {{{', '.join(f'{s:g}' for s in OWL_SPREADS)}}} "
            "(the paper's values: M = 5, λ = 0.08). The grid is measured on the evaluation set, so it shows how "
            "sensitive the result is to the options, not how to choose them. OWL's block sparsities come from the "
            "dense model's Wanda scores, so both criteria get the same ones.",
            "",
            f"![OWL against uniform]({name}.png)",
            "",
        ]
    else:
        lines += [f"![perplexity / dense]({name}.png)", ""]
    lines += table + [f"Whole run: {total / 60:.1f} minutes.", ""]
    text = "\n".join(lines)
    write_result(name, text)
    if not args.owl_grid:
        plot(ppl, dense, RESULTS / f"{name}.png")
    print(text)


if __name__ == "__main__":
    main()
