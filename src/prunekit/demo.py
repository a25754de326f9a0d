"""A self-contained demo: gradual magnitude pruning of a small MLP on scikit-learn's handwritten digits.

Run it with ``prunekit demo`` (or ``python -m prunekit demo``). It needs the ``demo`` extra::

    pip install "prunekit[demo]"

The digits data set (1,797 8×8 images, 10 classes) ships with scikit-learn, so nothing is downloaded.
The demo trains a 64-256-128-10 MLP dense, then prunes it to the target sparsity during training
with :class:`prunekit.Pruner` and a :class:`prunekit.Gradual` (cubic) schedule, fine-tunes it, and
compares the result with one-shot pruning of the dense model without any retraining.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import prune
from .methods.schedules import Gradual
from .pruner import Pruner
from .saving import save_pruned
from .sparse import to_sparse
from .sparse.choose import interleaved_seconds
from .summary import summary

#: Sparsities (fractions of the pruned weights) of the one-shot baseline curve.
ONESHOT_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)

_BATCH_SIZE = 64
_LEARNING_RATE = 1e-3
_PRUNE_OPTIONS = {"criterion": "magnitude", "granularity": "weight", "scope": "global"}


def _require_demo_extras() -> tuple[Any, Any, Any, Any]:
    """Import scikit-learn, matplotlib and tqdm, or explain how to install them."""
    try:
        import matplotlib
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from tqdm.auto import tqdm
    except ImportError as err:
        raise ImportError(
            f"the prunekit demo needs scikit-learn, matplotlib and tqdm ({err.name or err} is missing); "
            'install them with: pip install "prunekit[demo]"'
        ) from err
    return matplotlib, load_digits, train_test_split, tqdm


def _make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def _latency(dense: nn.Module, pruned: nn.Module, inputs: torch.Tensor) -> dict[str, Any]:
    """Milliseconds per pass on ``inputs`` of the dense model and of the pruned model's fastest form
    (:func:`prunekit.to_sparse`, which keeps a layer dense where its sparse kernel is slower)."""
    with warnings.catch_warnings():  # "keeping it dense" is an answer here, not a problem
        warnings.simplefilter("ignore")
        fast = to_sparse(pruned, inputs)
    dense.eval()
    with torch.no_grad():
        seconds = interleaved_seconds({"dense": lambda: dense(inputs), "fast": lambda: fast(inputs)}, 31)
    kernels = ", ".join(choice.kernel for choice in fast.prunekit_sparse.layers.values())
    return {
        "dense_latency_ms": 1e3 * seconds["dense"],
        "fast_latency_ms": 1e3 * seconds["fast"],
        "fast_kernels": kernels,
    }


def _file_sizes(dense: nn.Module, pruned: nn.Module) -> dict[str, int]:
    """Bytes of ``torch.save`` of the dense state dict and of the pruned model saved compressed
    (``pk.save_pruned(..., sparse=True)``: its non-zero values and their positions, entropy-coded)."""
    with tempfile.TemporaryDirectory() as folder:
        dense_path, small_path = Path(folder) / "dense.pt", Path(folder) / "pruned.pk"
        torch.save(dense.state_dict(), dense_path)
        save_pruned(pruned, small_path, sparse=True)
        return {"dense_file_bytes": dense_path.stat().st_size, "pruned_file_bytes": small_path.stat().st_size}


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction (0..1) of ``x`` that ``model`` classifies correctly."""
    was_training = model.training
    model.eval()
    correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train(was_training)
    return correct / len(y)


def _load_data(load_digits, train_test_split, seed: int):
    """Stratified 75/25 split of the digits, features standardised with the training statistics."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, stratify=digits.target, random_state=seed
    )
    x_train = torch.tensor(x_train, dtype=torch.float32)
    x_test = torch.tensor(x_test, dtype=torch.float32)
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp_min(1e-6)  # some border pixels are always 0
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return x_train, torch.tensor(y_train), x_test, torch.tensor(y_test)


def _save_plot(matplotlib, path: Path, result: dict[str, Any]) -> None:
    """Plot test accuracy (%) against sparsity (%): gradual pruning vs one-shot pruning without retraining.

    An inset zooms on the high sparsities, where the two differ.
    """
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # a bare Figure does not touch pyplot's global state

    gradual = result["gradual_curve"]
    oneshot = result["oneshot_curve"]
    dense = 100 * result["dense_accuracy"]
    lines = [  # (x, y, style)
        (
            [100 * p["sparsity"] for p in gradual],
            [100 * p["recovered_accuracy"] for p in gradual],
            {
                "marker": "o",
                "markersize": 4,
                "color": "tab:blue",
                "label": f"gradual pruning during training ({100 * result['pruned_accuracy']:.1f}% at the end)",
            },
        ),
        (
            [100 * p["sparsity"] for p in gradual],
            [100 * p["accuracy"] for p in gradual],
            {
                "marker": "v",
                "markersize": 4,
                "linestyle": "none",
                "color": "tab:blue",
                "alpha": 0.4,
                "label": "  the same, right after each pruning event (before training recovers)",
            },
        ),
        (
            [100 * p["sparsity"] for p in oneshot],
            [100 * p["accuracy"] for p in oneshot],
            {
                "marker": "s",
                "markersize": 4,
                "color": "tab:red",
                "label": "one-shot pruning of the dense model, no retraining",
            },
        ),
    ]

    fig = Figure(figsize=(8, 5.2), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    zoom = ax.inset_axes((0.08, 0.27, 0.55, 0.5))
    for axes in (ax, zoom):
        axes.axhline(dense, color="0.5", linestyle=":", linewidth=1, label=f"dense model ({dense:.1f}%)")
        for x, y, style in lines:
            axes.plot(x, y, **style)
        axes.grid(True, alpha=0.3)

    ax.set_xlabel("sparsity: pruned weights (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        "prunekit demo: MLP 64-256-128-10 on scikit-learn digits, global magnitude pruning\n"
        f"{100 * result['sparsity']:.0f}% sparse: {100 * result['pruned_accuracy']:.1f}% with gradual pruning "
        f"vs {100 * result['oneshot_accuracy']:.1f}% one-shot (dense {dense:.1f}%)",
        fontsize=10,
    )
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 101)
    ax.legend(loc="lower left", fontsize=8)

    zoom_from = 50.0
    shown = [y for x, ys, _ in lines for xi, y in zip(x, ys) if xi >= zoom_from and y >= dense - 15]
    zoom.set_xlim(zoom_from, min(100.0, max(100 * p["sparsity"] for p in oneshot) + 1))
    zoom.set_ylim(min([*shown, dense]) - 1, min(100.5, max([*shown, dense]) + 1))
    zoom.tick_params(labelsize=7)
    zoom.set_title("zoom on high sparsity", fontsize=8)
    ax.indicate_inset_zoom(zoom, edgecolor="0.4")

    fig.savefig(path)


def run_demo(
    sparsity: float = 0.9,
    steps: int = 1500,
    out: str | Path = "prunekit-demo.png",
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train, prune and fine-tune an MLP on the digits data set, print summaries and save a plot.

    The ``steps`` optimizer steps (Adam, mini-batches of 64 training images) are split into three
    phases: dense training (the first 30%), gradual pruning with a cubic :class:`~prunekit.Gradual`
    schedule up to ``sparsity`` (30% to 75%, about 20 pruning events) and fine-tuning at the final
    sparsity (the last 25%). All Linear layers are pruned, the output layer included, with global
    magnitude pruning of single weights. For comparison the dense model is also pruned one-shot
    (:func:`prunekit.prune`) to each of :data:`ONESHOT_SPARSITIES` without any retraining.

    Args:
        sparsity: final fraction of the weights to prune, in (0, 1) (0.9 = 90%).
        steps: total number of optimizer steps (≥ 100); 1500 is about 70 epochs of the 1,347 training images.
        out: path of the plot to write (test accuracy against sparsity); PNG unless the extension
            names another format matplotlib writes (.svg, .pdf, ...). Missing folders are created.
        seed: seed of the train/test split, the weight initialisation and the batch order.
        quiet: print nothing and show no progress bar.

    Returns:
        A dict with ``dense_accuracy`` and ``pruned_accuracy`` (fractions of the test set, 0..1),
        ``sparsity`` (achieved fraction of pruned weights), ``oneshot_accuracy`` (one-shot pruning to
        ``sparsity`` without retraining), ``gradual_curve`` (one ``{"step", "sparsity", "accuracy",
        "recovered_accuracy"}`` per pruning event: ``accuracy`` right after the event,
        ``recovered_accuracy`` after the training steps that follow it, i.e. just before the next
        event or, for the last, at the end), ``oneshot_curve`` (``{"sparsity", "accuracy"}`` points,
        the first one dense), ``dense_summary`` / ``pruned_summary`` (:class:`prunekit.Summary`),
        ``plot`` (the plot's path), ``dense_latency_ms`` / ``fast_latency_ms`` (milliseconds per pass on the
        test set of the dense model and of the pruned one after :func:`prunekit.to_sparse`), ``fast_kernels``
        (each layer's kernel, e.g. "csr, csr, dense"), ``dense_file_bytes`` / ``pruned_file_bytes`` (bytes of
        ``torch.save`` of the dense state dict and of the pruned model saved with
        ``pk.save_pruned(..., sparse=True)``) and ``seconds`` (wall time in seconds).

    Raises:
        ImportError: scikit-learn, matplotlib or tqdm is missing (``pip install "prunekit[demo]"``).
        ValueError: ``sparsity`` or ``steps`` is out of range.
    """
    matplotlib, load_digits, train_test_split, tqdm = _require_demo_extras()
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be a fraction in (0, 1), e.g. 0.9 for 90%, got {sparsity!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 100:
        raise ValueError(f"steps must be a whole number of optimizer steps ≥ 100, got {steps!r}")
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if Path(out).suffix and Path(out).suffix[1:].lower() not in formats:
        raise ValueError(f"cannot save a plot as {Path(out).suffix!r}; use one of .{', .'.join(sorted(formats))}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: one thread is fastest, and many times faster on a busy CPU
    try:
        return _run(float(sparsity), steps, Path(out), seed, quiet, matplotlib, load_digits, train_test_split, tqdm)
    finally:
        torch.set_num_threads(threads)


def _run(
    sparsity: float, steps: int, out: Path, seed: int, quiet: bool, matplotlib, load_digits, train_test_split, tqdm
) -> dict[str, Any]:
    """The body of :func:`run_demo`, arguments checked."""
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)  # fail now rather than after training

    def say(*lines: str) -> None:
        if not quiet:
            print(*lines, sep="\n", flush=True)

    x_train, y_train, x_test, y_test = _load_data(load_digits, train_test_split, seed)
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = _make_model()
    batches = torch.Generator().manual_seed(seed)

    prune_start = int(0.30 * steps)
    prune_end = int(0.75 * steps)
    every = max(1, (prune_end - prune_start) // 20)
    schedule = Gradual(start=prune_start, end=prune_end, every=every)
    events = set(schedule.events())  # the first, at prune_start, prunes nothing (the cubic starts at 0)
    pruning_events = sum(1 for e in events if schedule.sparsity_at(e, sparsity) > 0)

    optimizer = torch.optim.Adam(model.parameters(), lr=_LEARNING_RATE)
    pruner = Pruner(model, sparsity=sparsity, schedule=schedule, optimizer=optimizer, **_PRUNE_OPTIONS)
    loss_fn = nn.CrossEntropyLoss()

    say(
        "prunekit demo: a 64-256-128-10 MLP on scikit-learn's handwritten digits "
        f"({len(y_train)} training / {len(y_test)} test images, 10 classes)",
        f"  steps 1-{prune_start}: dense training (Adam, lr {_LEARNING_RATE:g}, batches of {_BATCH_SIZE})",
        f"  steps {prune_start + 1}-{prune_end}: gradual global magnitude pruning of all 3 Linear layers "
        f"(output layer included) to {sparsity:.0%}: {pruning_events} pruning events, every {every} steps (cubic schedule)",
        f"  steps {prune_end + 1}-{steps}: fine-tuning at {sparsity:.0%} sparsity",
        "",
    )

    dense_accuracy: float | None = None
    dense_summary = None
    dense_copy: nn.Module | None = None
    gradual_curve: list[dict[str, float]] = []
    order = torch.randperm(len(y_train), generator=batches)
    position = 0
    model.train()
    progress = tqdm(total=steps, desc="training", unit="step", disable=quiet, leave=False)
    try:
        for _ in range(steps):
            if position + _BATCH_SIZE > len(order):
                order, position = torch.randperm(len(y_train), generator=batches), 0
            index = order[position : position + _BATCH_SIZE]
            position += _BATCH_SIZE

            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_train[index]), y_train[index])
            loss.backward()
            optimizer.step()
            due = pruner.step_count + 1 in events  # this pruner.step() is a pruning event
            if due:
                accuracy = _accuracy(model, x_test, y_test)
                if gradual_curve:  # the training steps since the last event are done
                    gradual_curve[-1]["recovered_accuracy"] = accuracy
                else:  # dense training is done
                    dense_accuracy, dense_summary, dense_copy = accuracy, summary(model), copy.deepcopy(model)
            pruner.step()
            if due:
                point = {
                    "step": pruner.step_count,
                    "sparsity": pruner.sparsity,
                    "accuracy": _accuracy(model, x_test, y_test),
                }
                gradual_curve.append(point)
                progress.set_postfix(sparsity=f"{point['sparsity']:.0%}", acc=f"{point['accuracy']:.1%}")
            progress.update()
    finally:
        progress.close()
    assert dense_accuracy is not None and dense_summary is not None and dense_copy is not None

    pruned_accuracy = _accuracy(model, x_test, y_test)
    gradual_curve[-1]["recovered_accuracy"] = pruned_accuracy
    achieved = pruner.sparsity
    pruner.remove()  # a plain model again; the pruned weights stay zero
    pruned_summary = summary(model)

    oneshot_curve = [{"sparsity": 0.0, "accuracy": dense_accuracy}]
    oneshot_at_target = dense_accuracy
    for level in sorted({*ONESHOT_SPARSITIES, sparsity}):
        candidate = copy.deepcopy(dense_copy)
        oneshot = prune(candidate, sparsity=level, **_PRUNE_OPTIONS)
        oneshot_curve.append({"sparsity": oneshot.sparsity, "accuracy": _accuracy(candidate, x_test, y_test)})
        if level == sparsity:
            oneshot_at_target = oneshot_curve[-1]["accuracy"]

    result: dict[str, Any] = {
        "dense_accuracy": dense_accuracy,
        "pruned_accuracy": pruned_accuracy,
        "sparsity": achieved,
        "oneshot_accuracy": oneshot_at_target,
        "gradual_curve": gradual_curve,
        "oneshot_curve": oneshot_curve,
        "dense_summary": dense_summary,
        "pruned_summary": pruned_summary,
        "plot": str(out),
    }
    _save_plot(matplotlib, out, result)
    latency = _latency(dense_copy, model, x_test)
    result.update(latency)
    sizes = _file_sizes(dense_copy, model)
    result.update(sizes)
    result["seconds"] = time.perf_counter() - started

    say(
        f"Dense model after {prune_start} steps: test accuracy {dense_accuracy:.1%}",
        str(dense_summary),
        "",
        f"Pruned model after {steps} steps: test accuracy {pruned_accuracy:.1%}, "
        f"{achieved:.1%} of the Linear weights pruned",
        str(pruned_summary),
        "",
        f"Test accuracy: dense {dense_accuracy:.1%} -> gradually pruned and fine-tuned {pruned_accuracy:.1%} "
        f"({100 * (pruned_accuracy - dense_accuracy):+.1f} points) at {achieved:.1%} sparsity, "
        f"{dense_summary.nonzero_params / pruned_summary.nonzero_params:.1f}x fewer non-zero parameters.",
        f"One-shot pruning of the dense model to the same sparsity, without retraining: {oneshot_at_target:.1%}.",
        f"Latency on the {len(y_test)} test images (1 thread, median of interleaved runs): dense "
        f"{latency['dense_latency_ms']:.3f} ms, pruned with pk.to_sparse ({latency['fast_kernels']}) "
        f"{latency['fast_latency_ms']:.3f} ms (x{latency['dense_latency_ms'] / latency['fast_latency_ms']:.2f}).",
        f"File size: dense state dict {sizes['dense_file_bytes'] / 1024:.1f} KiB (torch.save), pruned model "
        f"{sizes['pruned_file_bytes'] / 1024:.1f} KiB (pk.save_pruned(..., sparse=True), lossless; "
        f"x{sizes['dense_file_bytes'] / sizes['pruned_file_bytes']:.1f} smaller).",
        f"Plot of accuracy against sparsity written to {out} ({result['seconds']:.1f} s in all).",
    )
    return result
