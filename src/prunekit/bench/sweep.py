"""Sweeps: methods × compressions × seeds, each pruned model fine-tuned with the same budget.

Over 400 lines because a sweep (methods × compressions × seeds), its fine-tuning loop and its
progress reporting are one protocol, read top to bottom.

The protocol follows ShrinkBench (Blalock et al. 2020, "What is the State of Neural Network Pruning?"):
train a dense model per seed, prune a copy of it with each method to each compression, fine-tune it
with a fixed budget, and report accuracy against compression with the spread over seeds.
Compression is total / non-zero parameters *of the pruned layers* (the pruner's targets):
c = 1 / (1 − s) for a sparsity (fraction) s; leave the output layer out with ``exclude`` as
ShrinkBench does. Each row also records ``model_compression`` (all parameters, biases and
unpruned layers included).

Example, on your own model and data::

    from prunekit import bench
    result = bench.sweep(lambda: MyNet(), split, bench.SHRINKBENCH_METHODS, compressions=[1, 2, 4, 8, 16],
                         pretrain=bench.TrainConfig(epochs=10), finetune=bench.TrainConfig(epochs=3),
                         exclude=["classifier"], seeds=[0, 1, 2])
    print(result.to_markdown()); result.plot("sweep.png")
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import Split
from ..methods.schedules import Gradual, Iterative
from ..pruner import Pruner
from ..summary import summary
from .results import SweepResult
from .train import TrainConfig, evaluate, gradient_batches, total_steps, train

SCHEDULES = ("oneshot", "iterative", "gradual")


@dataclass(frozen=True)
class Method:
    """One pruning method of a sweep.

    Args:
        name: the label in tables and plots.
        criterion / scope: as in :class:`prunekit.Pruner` (``"magnitude"``, ``"gradient"``, ``"random"``, ...;
            ``"global"`` or ``"local"``).
        schedule: ``"oneshot"`` (prune, then fine-tune), ``"iterative"`` (``rounds`` prune-and-retrain
            rounds sharing the fine-tuning budget equally, each removing the same fraction of what is
            left and retraining with a fresh optimizer and learning-rate schedule, as Han et al. 2015) or ``"gradual"`` (Zhu & Gupta 2017's cubic schedule over the
            first ``gradual_share`` of the budget, pruning ``gradual_events`` times, then fine-tuning).
        finetune: False to prune one-shot and evaluate right away, without retraining.
        layer_sparsity: per-layer final sparsities (fractions), as in :class:`prunekit.Pruner`.
        gradient_batches: batches (of the fine-tuning batch size) the gradient criteria score on.
        compressions: run this method only at these compressions (default: all of the sweep's).
        options: further :class:`prunekit.Pruner` arguments.
    """

    name: str
    criterion: str = "magnitude"
    scope: str = "global"
    schedule: str = "oneshot"
    finetune: bool = True
    rounds: int = 4
    gradual_share: float = 0.75
    gradual_events: int = 20
    layer_sparsity: Mapping[str, float] | None = None
    gradient_batches: int = 8
    compressions: tuple[float, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {', '.join(map(repr, SCHEDULES))}")
        if not self.finetune and self.schedule != "oneshot":
            raise ValueError(f"method {self.name!r}: without fine-tuning only the 'oneshot' schedule makes sense")
        if self.rounds < 1 or self.gradual_events < 1 or not 0 < self.gradual_share <= 1:
            raise ValueError(f"method {self.name!r}: rounds and gradual_events must be ≥ 1, gradual_share in (0, 1]")


#: The five methods of Blalock et al. 2020's comparison (their Figure 8 baselines), one-shot + fine-tune.
SHRINKBENCH_METHODS = (
    Method("global magnitude", "magnitude", "global"),
    Method("layerwise magnitude", "magnitude", "local"),
    Method("global gradient magnitude", "gradient", "global"),
    Method("layerwise gradient magnitude", "gradient", "local"),
    Method("random", "random", "local"),
)


def sparsity_for(compression: float) -> float:
    """Sparsity (fraction pruned) giving ``compression`` = total / non-zero: s = 1 − 1/c."""
    if not compression >= 1:
        raise ValueError(f"compression must be ≥ 1 (total / non-zero parameters), got {compression}")
    return 1.0 - 1.0 / compression


@contextmanager
def _threads(count: int | None):
    # The benchmark models are small: one thread runs them fastest, and many times faster than
    # several threads do on a busy CPU.
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False)


def _seeded(model_fn: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_fn()


def prune_and_finetune(
    model: nn.Module,
    method: Method,
    compression: float,
    data: Split,
    finetune: TrainConfig,
    seed: int,
    exclude: Sequence | None = None,
    progress=None,
) -> dict[str, Any]:
    """Prune ``model`` (in place) with ``method`` to ``compression`` and fine-tune it; returns one row.

    The row has ``accuracy`` (after fine-tuning), ``accuracy_before_finetune`` (one-shot methods
    only: right after pruning), ``sparsity`` (fraction of the pruned layers' weights that are zero),
    ``compression`` (1 / (1 − sparsity)) and ``model_compression`` (all parameters of the model).
    """
    options: dict[str, Any] = {"criterion": method.criterion, "scope": method.scope, **method.options}
    if method.criterion == "random":  # the run's seed seeds the random criterion; the others take none
        options["seed"] = seed
    if method.layer_sparsity is not None:
        options["layer_sparsity"] = dict(method.layer_sparsity)
    if exclude:
        options["exclude"] = list(exclude)
    if method.criterion == "gradient":
        options["data"] = gradient_batches(data, method.gradient_batches, finetune.batch_size, seed)
        options["loss_fn"] = nn.functional.cross_entropy
    steps = total_steps(data, finetune) if method.finetune else 0
    phases = [steps]
    if method.schedule == "iterative":
        # Han et al.: prune, then retrain, R times. Every round retrains N/R steps with a fresh
        # optimizer and learning-rate schedule, and the next round prunes when it is done.
        per_round = max(1, steps // method.rounds)
        phases = [per_round] * (method.rounds - 1) + [steps - per_round * (method.rounds - 1)]
        options["schedule"] = Iterative(0, per_round * (method.rounds - 1), method.rounds)
    elif method.schedule == "gradual":
        end = max(1, int(method.gradual_share * steps))
        options["schedule"] = Gradual(0, end, every=max(1, end // method.gradual_events))
    pruner = Pruner(model, sparsity_for(compression), **options)
    pruner.prune()
    row: dict[str, Any] = {"accuracy_before_finetune": None}
    if method.schedule == "oneshot":
        row["accuracy_before_finetune"] = evaluate(model, data.x_eval, data.y_eval)
    for phase in phases if method.finetune else ():
        train(model, data, finetune, seed, after_step=lambda _: pruner.step(), progress=progress, steps=phase)
    sparsity = pruner.sparsity
    pruner.remove()
    stats = summary(model)
    row.update(
        accuracy=evaluate(model, data.x_eval, data.y_eval),
        sparsity=sparsity,
        compression=1.0 / (1.0 - sparsity),
        model_compression=stats.compression,
    )
    return row


def sweep(
    model_fn: Callable[[], nn.Module],
    data: Split,
    methods: Iterable[Method],
    compressions: Iterable[float],
    pretrain: TrainConfig,
    finetune: TrainConfig,
    seeds: Iterable[int] = (0, 1, 2),
    exclude: Sequence | None = None,
    threads: int | None = 1,
    progress: bool = True,
) -> SweepResult:
    """Run ``methods`` × ``compressions`` × ``seeds`` and return the rows as a :class:`SweepResult`.

    Per seed, ``model_fn()`` is built under ``torch.manual_seed(seed)`` and trained dense with
    ``pretrain``; every (method, compression) then prunes a copy of that dense model and fine-tunes it
    with ``finetune`` (the same budget for all). Compression 1 is the dense model fine-tuned with the
    same budget, measured once per seed and shared by the methods that fine-tune (the others get the
    dense accuracy). ``exclude`` leaves layers out (e.g. the output layer); ``threads`` sets torch's
    CPU threads for the run (None leaves them alone). Shows a tqdm progress bar when tqdm is installed.
    """
    methods, compressions, seeds = list(methods), sorted(set(compressions)), list(seeds)
    if not methods or not compressions or not seeds:
        raise ValueError("sweep needs at least one method, one compression and one seed")
    for compression in [*compressions, *(c for m in methods for c in m.compressions or ())]:
        sparsity_for(compression)
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")

    def pruned(method: Method) -> list[float]:
        return [c for c in (compressions if method.compressions is None else method.compressions) if c > 1]

    per_seed = total_steps(data, pretrain) + total_steps(data, finetune) * (
        (1 in compressions) + sum(len(pruned(m)) for m in methods if m.finetune)
    )
    result = SweepResult(
        settings={
            "data": data.description,
            "pretrain": vars(pretrain),
            "finetune": vars(finetune),
            "seeds": seeds,
            "exclude": [str(e) for e in exclude or ()],
        }
    )
    bar = _progress_bar(per_seed * len(seeds), "sweep", progress)
    try:
        with _threads(threads):
            for seed in seeds:
                dense = _seeded(model_fn, seed)
                train(dense, data, pretrain, seed, progress=bar)
                dense_accuracy = evaluate(dense, data.x_eval, data.y_eval)
                result.dense.append({"seed": seed, "accuracy": dense_accuracy})
                if 1 in compressions:
                    baseline = copy.deepcopy(dense)
                    train(baseline, data, finetune, seed, progress=bar)
                    finetuned = evaluate(baseline, data.x_eval, data.y_eval)
                for method in methods:
                    if 1 in compressions and method.compressions is None:
                        accuracy = finetuned if method.finetune else dense_accuracy
                        result.rows.append(_row(method, 1, seed, accuracy=accuracy, compression=1.0, sparsity=0.0))
                    for compression in pruned(method):
                        row = prune_and_finetune(
                            copy.deepcopy(dense), method, compression, data, finetune, seed, exclude, bar
                        )
                        result.rows.append(_row(method, compression, seed, **row))
    finally:
        if bar is not None:
            bar.close()
    return result


def _row(method: Method, point: float, seed: int, **values: Any) -> dict[str, Any]:
    return {"method": method.name, "point": point, "seed": seed, **values}


#: Variants of :func:`lottery_ticket`.
LOTTERY_VARIANTS = ("rewind to init", "rewind to early step", "random reinit", "fine-tune")


def lottery_ticket(
    model_fn: Callable[[], nn.Module],
    data: Split,
    config: TrainConfig,
    rounds: int = 10,
    rate: float = 0.2,
    layer_rates: Mapping[str, float] | None = None,
    rewind_step: int = 0,
    variants: Iterable[str] = LOTTERY_VARIANTS,
    seeds: Iterable[int] = (0, 1, 2),
    exclude: Sequence | None = None,
    threads: int | None = 1,
    progress: bool = True,
) -> SweepResult:
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019, "The Lottery Ticket Hypothesis").

    Every round trains the network for ``config`` (its epochs), then prunes ``rate`` of each layer's
    remaining weights by magnitude (``layer_rates`` overrides per layer name pattern, e.g. ``{"fc3":
    0.1}`` for the output layer), ``rounds`` times; after round r a layer keeps (1 − rate)^r of its weights.
    What the survivors start the next round from is the variant:

    - ``"rewind to init"``: their values at initialisation (Frankle & Carbin 2019);
    - ``"rewind to early step"``: their values after ``rewind_step`` optimizer steps of the first round
      (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis"); later rounds
      then train ``rewind_step`` steps fewer, so every round ends at the same step count;
    - ``"random reinit"``: a fresh random initialisation with the mask of the "rewind to init" ticket
      of the same round (Frankle & Carbin's control);
    - ``"fine-tune"``: their trained values (no rewinding), trained for the same budget again.

    A fresh optimizer starts every round. Rows: ``point`` = round 1..``rounds`` (round 0, the dense
    network every variant starts from, is in ``result.dense``), ``accuracy`` at the end of the round's
    training, ``compression`` = total / non-zero weights of the pruned layers, ``remaining`` = 1 / compression.
    """
    variants, seeds = list(variants), list(seeds)
    unknown = set(variants) - set(LOTTERY_VARIANTS)
    if unknown:
        raise ValueError(f"unknown lottery variants {sorted(unknown)}; valid: {', '.join(LOTTERY_VARIANTS)}")
    if "random reinit" in variants and "rewind to init" not in variants:
        raise ValueError("'random reinit' reuses the masks of 'rewind to init'; list both")
    if not 0 < rate < 1 or rounds < 1:
        raise ValueError(f"rate must be in (0, 1) and rounds ≥ 1, got rate={rate}, rounds={rounds}")
    round_steps = total_steps(data, config)
    if "rewind to early step" in variants and not 0 < rewind_step < round_steps:
        raise ValueError(f"rewind_step must be between 1 and the {round_steps - 1} steps of a round, got {rewind_step}")
    chains = [v for v in variants if v != "random reinit"]
    per_seed = round_steps * (rounds + 1) * len(chains) + round_steps * rounds * ("random reinit" in variants)
    result = SweepResult(
        settings={
            "data": data.description,
            "train": vars(config),
            "rounds": rounds,
            "rate": rate,
            "layer_rates": dict(layer_rates or {}),
            "rewind_step": rewind_step,
            "seeds": seeds,
        }
    )
    bar = _progress_bar(per_seed * len(seeds), "lottery", progress)
    try:
        with _threads(threads):
            for seed in seeds:
                for variant in chains:
                    _lottery_chain(model_fn, data, config, rounds, rate, layer_rates, rewind_step, variant,
                                   "random reinit" in variants, seed, exclude, result, bar)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    result.rows.sort(key=lambda row: (variants.index(row["method"]), row["seed"], row["point"]))
    return result


def _lottery_chain(
    model_fn, data, config, rounds, rate, layer_rates, rewind_step, variant, with_reinit, seed, exclude, result, bar
) -> None:
    model = _seeded(model_fn, seed)
    round_steps = total_steps(data, config)
    schedule, final = Iterative.per_round(rate, rounds, start=round_steps, every=round_steps)
    if variant == "rewind to early step":
        # After round 0 every round trains round_steps − rewind_step steps; events move with them.
        later = round_steps - rewind_step
        schedule = Iterative(round_steps, round_steps + later * (rounds - 1), rounds)
    overrides = {name: 1.0 - (1.0 - r) ** rounds for name, r in (layer_rates or {}).items()}
    pruner = Pruner(model, final, scope="local", schedule=schedule, layer_sparsity=overrides or None, exclude=exclude)
    if variant == "rewind to init":
        pruner.rewind_to(0)
    elif variant == "rewind to early step":
        pruner.rewind_to(rewind_step)
    for round_index in range(rounds + 1):
        if round_index and with_reinit and variant == "rewind to init":
            _train_reinit(model_fn, pruner.masks, data, config, seed, round_index, result, bar)
        steps = round_steps - rewind_step if round_index and variant == "rewind to early step" else round_steps
        accuracy: list[float] = []

        def after_step(step: int, steps: int = steps, accuracy: list[float] = accuracy) -> None:
            if step == steps:  # the round's training is done; its pruning event comes in pruner.step()
                accuracy.append(evaluate(model, data.x_eval, data.y_eval))
            pruner.step()

        sparsity = pruner.sparsity
        train(model, data, config, seed, after_step=after_step, progress=bar, steps=steps)
        row = {"accuracy": accuracy[0], "compression": 1.0 / (1.0 - sparsity), "remaining": 1.0 - sparsity}
        if round_index == 0:
            if not any(r["seed"] == seed for r in result.dense):  # every chain starts with the same dense run
                result.dense.append({"seed": seed, "accuracy": accuracy[0]})
            continue
        result.rows.append({"method": variant, "point": round_index, "seed": seed, **row})
    pruner.remove()


def _train_reinit(model_fn, masks, data, config, seed, round_index, result, bar) -> None:
    """Frankle & Carbin's control: the ticket's mask on a fresh random initialisation."""
    fresh = _seeded(model_fn, 10_000 + 100 * seed + round_index)
    params = dict(fresh.named_parameters())
    kept = [(params[name], keep) for name, keep in masks.items()]

    @torch.no_grad()
    def apply_masks(_step: int = 0) -> None:
        for param, keep in kept:
            param.mul_(keep)

    apply_masks()
    train(fresh, data, config, seed, after_step=apply_masks, progress=bar)
    total = sum(keep.numel() for _, keep in kept)
    remaining = sum(int(keep.sum()) for _, keep in kept) / total
    result.rows.append(
        {
            "method": "random reinit",
            "point": round_index,
            "seed": seed,
            "accuracy": evaluate(fresh, data.x_eval, data.y_eval),
            "compression": 1.0 / remaining,
            "remaining": remaining,
        }
    )


def round_remaining(rate: float, round_index: int) -> float:
    """Fraction of a layer's weights left after ``round_index`` rounds that each prune ``rate``: (1 − rate)^r."""
    return (1.0 - rate) ** round_index


__all__ = [
    "LOTTERY_VARIANTS",
    "Method",
    "SHRINKBENCH_METHODS",
    "lottery_ticket",
    "prune_and_finetune",
    "round_remaining",
    "sparsity_for",
    "sweep",
]
