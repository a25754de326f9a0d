"""Shared helpers for the benchmarks: peak-memory probes, timing, machine description, result files."""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def trim_memory() -> None:
    """Return freed memory to the OS so the resident set measures what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Extra peak resident memory (bytes) of the code run inside the ``with`` block.

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` ← 5) on entry, so the peak is the
    block's own, not the process's earlier history. Run each measurement in a fresh process when
    earlier work may have left freed memory cached.
    """

    def __enter__(self):
        trim_memory()
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        self.before = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        self.peak = _status_kib("VmHWM") * 1024
        self.extra = self.peak - self.before
        return False


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (the platform's processor name elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model, cores, memory, Python and torch versions and torch's thread count, for a results file."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {memory_gib:.0f} GiB RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def today() -> str:
    return datetime.date.today().isoformat()


def write_result(name: str, text: str) -> Path:
    """Write ``results/<name>.md``; a text that does not name the CPU model gets a ``Machine:`` line
    (:func:`machine`: CPU model and thread count included), so every results file says where it ran."""
    if cpu_model() not in text:
        text = text.rstrip("\n") + f"\n\nMachine: {machine()}. Date: {today()}.\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    return path


#: Where CI and developers keep the MNIST test set: ``../shared/data/mnist10k`` beside the repository.
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist10k"


def add_study_arguments(parser) -> None:
    """The options every accuracy study takes: --quick, --data, --out."""
    parser.add_argument("--quick", action="store_true", help="a few minutes on 2 cores: fewer seeds, epochs, points")
    parser.add_argument(
        "--data",
        default=str(MNIST_DIR),
        help="folder with t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] (default: %(default)s); "
        "without them the study falls back to scikit-learn's digits, with a warning",
    )
    parser.add_argument(
        "--out", default=str(RESULTS), help="folder for <study>.md, .png and .json (default: %(default)s)"
    )


def single_thread_machine() -> str:
    """:func:`machine`, noting that the studies train on one thread (small models train fastest so)."""
    return machine().replace(f"({torch.get_num_threads()} threads)", "(studies run on 1 thread)")


def mean_std(values) -> str:
    """ "mean ± std" of fractions, in percent with two decimals."""
    import statistics

    values = [100 * v for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"


def training_config(model: str, epochs: float):
    """The dense-training settings of the accuracy studies, per model (fine-tuning reuses them with
    fewer epochs, restarting the learning-rate schedule). LeNet-300-100: SGD as in Caffe (momentum
    0.9, L2 5e-4, lr 0.05); LeNet-5 trains better with Adam here (98.4% vs 98.2% with SGD at lr 0.01,
    one seed, 15 epochs; at lr 0.05 SGD diverges, its convolutions have no ReLU). Both decay the
    learning rate to 0 along a cosine, batches of 64."""
    from prunekit import bench

    if model == "lenet-300-100":
        return bench.TrainConfig(epochs, lr=0.05, optimizer="sgd", weight_decay=5e-4, lr_decay="cosine")
    if model == "lenet-5":
        return bench.TrainConfig(epochs, lr=1e-3, optimizer="adam", lr_decay="cosine")
    raise ValueError(f"no training settings for {model!r}")


def describe_training(config) -> str:
    """One phrase for a results file: optimizer, learning rate, decay, batch size, epochs."""
    extras = f"momentum {config.momentum:g}, " if config.optimizer == "sgd" else ""
    decay = "cosine decay to 0" if config.lr_decay == "cosine" else "constant learning rate"
    l2 = f", L2 {config.weight_decay:g}" if config.weight_decay else ""
    return f"{config.epochs:g} epochs, {config.optimizer} (lr {config.lr:g}, {extras}{decay}{l2}), batch {config.batch_size}"


def study_main(doc: str, study: str, protocols: dict, run, report, plot, argv=None) -> None:
    """The command line shared by the accuracy studies: parse --quick/--data/--out, run the protocol
    ("full" or "quick") on the benchmark split, and write <study>.md, .json and .png (with a
    ``_quick`` suffix for --quick, so a quick run never overwrites the committed full results)."""
    import argparse
    import json
    import time

    from prunekit.bench import SweepResult
    from prunekit.data import benchmark_split

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser)
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the .md and .png from the saved .json without training"
    )
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    split = benchmark_split(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = study if mode == "full" else f"{study}_quick"
    if args.report_only:
        raw = json.loads((out / f"{name}.json").read_text())
        seconds = raw.pop("_seconds")
        results = {model: SweepResult(r["rows"], r["dense"], r["settings"]) for model, r in raw.items()}
    else:
        started = time.perf_counter()
        results = run(protocols[mode], split)
        seconds = time.perf_counter() - started
        raw = {model: {"settings": r.settings, "dense": r.dense, "rows": r.rows} for model, r in results.items()}
        (out / f"{name}.json").write_text(json.dumps({**raw, "_seconds": seconds}, indent=1))
    plot(results, out / f"{name}.png")
    text = report(results, protocols[mode], mode, split, seconds, name)
    (out / f"{name}.md").write_text(text)
    print(text)


def interleaved_latency(models: dict, batch, rounds: int, repeats: int) -> dict[str, float]:
    """Median seconds per forward pass of each model on ``batch`` (eval mode is the caller's), no grad:
    every model once per round, in turn, ``repeats`` passes each, so the machine's drift hits all alike."""
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
