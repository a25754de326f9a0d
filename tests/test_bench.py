"""The benchmark harness on tiny settings, and each study's smallest form with its qualitative result."""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit import bench, data

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist10k"


def tiny_split(n: int = 240, seed: int = 0) -> data.Split:
    """Four classes of 4×4 images: one bright quadrant per class, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = 0.3 * torch.randn(n, 1, 4, 4, generator=generator)
    for cls in range(4):
        rows, cols = divmod(cls, 2)
        images[labels == cls, 0, 2 * rows : 2 * rows + 2, 2 * cols : 2 * cols + 2] += 1.0
    cut = 3 * n // 4
    return data.Split(images[:cut], labels[:cut], images[cut:], labels[cut:], "tiny", "tiny synthetic data")


def tiny_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


FAST = bench.TrainConfig(epochs=3, lr=1e-2, batch_size=16)


def test_training_is_deterministic_and_learns():
    split = tiny_split()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = tiny_mlp()
        bench.train(model, split, FAST, seed=5)
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert bench.evaluate(models[0], split.x_eval, split.y_eval) > 0.9


def test_cosine_decay_and_step_budget():
    split = tiny_split()
    model = tiny_mlp()
    calls = []
    bench.train(model, split, FAST.scaled(lr_factor=0.5), seed=0, after_step=calls.append, steps=7)
    assert calls == list(range(1, 8))
    assert bench.steps_per_epoch(split, 16) == 180 // 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": -1}, "epochs"),
        ({"epochs": 1, "optimizer": "rmsprop"}, "optimizer"),
        ({"epochs": 1, "lr_decay": "step"}, "lr_decay"),
        ({"epochs": 1, "batch_size": 0}, "batch_size"),
        ({"epochs": 1, "lr": 0}, "lr"),
    ],
)
def test_train_config_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.TrainConfig(**kwargs)


def test_method_refuses_bad_settings():
    with pytest.raises(ValueError, match="unknown schedule"):
        bench.Method("x", schedule="cyclic")
    with pytest.raises(ValueError, match="without fine-tuning"):
        bench.Method("x", schedule="iterative", finetune=False)


def test_sparsity_for_compression():
    assert bench.sparsity_for(1) == 0.0
    assert bench.sparsity_for(4) == 0.75
    with pytest.raises(ValueError, match="compression must be ≥ 1"):
        bench.sparsity_for(0.5)


def test_sweep_rows_reach_their_compressions_and_repeat_exactly():
    split = tiny_split()
    methods = [bench.Method("global magnitude"), bench.Method("random", "random", "local")]

    def run():
        return bench.sweep(
            tiny_mlp, split, methods, [1, 4], FAST, FAST.scaled(1), seeds=[0], exclude=["3"], progress=False
        )

    result = run()
    assert len(result.rows) == 4 and len(result.dense) == 1
    pruned = [r for r in result.rows if r["point"] == 4]
    for row in pruned:
        assert row["compression"] == pytest.approx(4.0, rel=1e-3)
        # The output layer (128 weights) and the biases stay dense: the whole model is compressed less.
        assert row["model_compression"] < row["compression"]
    dense_rows = [r for r in result.rows if r["point"] == 1]
    assert dense_rows[0]["accuracy"] == dense_rows[1]["accuracy"]  # measured once, shared
    assert run().rows == result.rows


def test_sweep_refuses_duplicate_names_and_empty_lists():
    split = tiny_split()
    with pytest.raises(ValueError, match="unique"):
        bench.sweep(tiny_mlp, split, [bench.Method("a"), bench.Method("a")], [2], FAST, FAST, progress=False)
    with pytest.raises(ValueError, match="at least one"):
        bench.sweep(tiny_mlp, split, [], [2], FAST, FAST, progress=False)
    with pytest.raises(ValueError, match="compression must be ≥ 1"):
        bench.sweep(tiny_mlp, split, [bench.Method("a")], [0], FAST, FAST, progress=False)


@pytest.mark.parametrize("schedule", ["oneshot", "iterative", "gradual"])
def test_every_schedule_ends_at_the_compression_with_pruned_weights_at_zero(schedule):
    split = tiny_split()
    torch.manual_seed(0)
    model = tiny_mlp()
    bench.train(model, split, FAST, seed=0)
    method = bench.Method("m", schedule=schedule, rounds=3, gradual_events=4)
    row = bench.prune_and_finetune(model, method, 8, split, FAST.scaled(2), seed=0)
    assert row["compression"] == pytest.approx(8.0, rel=1e-2)
    weights = torch.cat([model[1].weight.flatten(), model[3].weight.flatten()])
    assert int((weights == 0).sum()) == round(7 / 8 * weights.numel())
    assert (row["accuracy_before_finetune"] is None) == (schedule != "oneshot")


def test_without_finetuning_the_accuracy_is_the_one_right_after_pruning():
    split = tiny_split()
    torch.manual_seed(0)
    model = tiny_mlp()
    bench.train(model, split, FAST, seed=0)
    row = bench.prune_and_finetune(model, bench.Method("m", finetune=False), 4, split, FAST, seed=0)
    assert row["accuracy"] == row["accuracy_before_finetune"]


def test_gradient_criterion_method_runs_with_batches_from_the_split():
    split = tiny_split()
    model = tiny_mlp()
    method = bench.Method("gradient", "gradient", "local", gradient_batches=2)
    row = bench.prune_and_finetune(model, method, 4, split, FAST.scaled(1), seed=0, exclude=["3"])
    assert row["compression"] == pytest.approx(4.0, rel=1e-2)
    assert int((model[3].weight == 0).sum()) == 0


def test_results_table_plot_and_json(tmp_path):
    rows = [
        {"method": "a", "point": 2, "seed": s, "accuracy": acc, "compression": 2.0} for s, acc in [(0, 0.90), (1, 0.92)]
    ] + [{"method": "a", "point": 8, "seed": s, "accuracy": 0.85, "compression": 7.0} for s in (0, 1)]
    result = bench.SweepResult(rows, [{"seed": 0, "accuracy": 0.91}, {"seed": 1, "accuracy": 0.93}], {"k": 1})
    table = result.to_markdown()
    assert "| a | 91.00 ± 1.41 | 85.00 ± 0.00 (7.0×) |" in table
    assert "| dense (no pruning), 2 seeds | 92.00 ± 1.41 |" in table
    assert result.best_within(1.0, "a").point == 2  # 91.00 is 1.00 point below the dense 92.00
    assert result.best_within(0.5, "a") is None
    assert result.best_within(10, "a").point == 8
    assert result.best_within(10, "b") is None
    png = result.plot(tmp_path / "plot.png", title="t")
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:4] == b"\x89PNG"
    result.to_json(tmp_path / "r.json")
    loaded = bench.SweepResult.from_json(tmp_path / "r.json")
    assert loaded.rows == result.rows and loaded.dense == result.dense and loaded.settings == {"k": 1}
    with pytest.raises(ValueError, match="path"):
        result.plot()


def test_lottery_ticket_rounds_prune_each_layer_at_its_rate():
    split = tiny_split()
    result = bench.lottery_ticket(
        tiny_mlp, split, FAST.scaled(1), rounds=2, rate=0.2, layer_rates={"3": 0.1}, rewind_step=3,
        seeds=[0], progress=False,
    )  # fmt: skip
    assert result.methods == list(bench.LOTTERY_VARIANTS)
    assert len(result.dense) == 1
    for round_index in (1, 2):
        expected = (512 * 0.8**round_index + 128 * 0.9**round_index) / 640
        remaining = {r["method"]: r["remaining"] for r in result.rows if r["point"] == round_index}
        assert set(remaining) == set(bench.LOTTERY_VARIANTS)
        for value in remaining.values():
            assert value == pytest.approx(expected, abs=2 / 640)


def test_rewinding_to_init_restores_the_initial_values_of_the_survivors():
    # The harness relies on the pruner's rewind: after a round, kept weights equal their initial values.
    split = tiny_split()
    torch.manual_seed(0)
    model = tiny_mlp()
    initial = copy.deepcopy(model.state_dict())
    steps = bench.steps_per_epoch(split, FAST.batch_size)
    schedule, final = __import__("prunekit").Iterative.per_round(0.2, rounds=1, start=steps, every=steps)
    pruner = __import__("prunekit").Pruner(model, final, schedule=schedule)
    pruner.rewind_to(0)
    bench.train(model, split, FAST.scaled(1), seed=0, after_step=lambda _: pruner.step())
    keep = pruner.masks["1.weight"]
    assert torch.equal(model[1].weight[keep], initial["1.weight"][keep])
    assert int((~keep).sum()) == round(0.2 * keep.numel())


def test_lottery_ticket_refuses_bad_settings():
    split = tiny_split()
    with pytest.raises(ValueError, match="unknown lottery variants"):
        bench.lottery_ticket(tiny_mlp, split, FAST, variants=["rewind to nowhere"], progress=False)
    with pytest.raises(ValueError, match="reuses the masks"):
        bench.lottery_ticket(tiny_mlp, split, FAST, variants=["random reinit"], progress=False)
    with pytest.raises(ValueError, match="rewind_step"):
        bench.lottery_ticket(tiny_mlp, split, FAST, rewind_step=0, progress=False)
    with pytest.raises(ValueError, match="rate"):
        bench.lottery_ticket(tiny_mlp, split, FAST, rate=1.5, progress=False)


def test_lenet_models_have_the_papers_sizes():
    assert sum(p.numel() for p in bench.LeNet300100().parameters()) == 266_610
    assert sum(p.numel() for p in bench.LeNet5().parameters()) == 431_080
    assert bench.LeNet5()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


# ---------------------------------------------------------------- each study's smallest form


def _study(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def benchmark_split():
    """MNIST's 8,000 / 2,000 split where ../shared holds it (CI does), else the digits fallback."""
    with pytest.warns(UserWarning) if data.mnist_files(MNIST_DIR) is None else _no_warning():
        return data.benchmark_split(MNIST_DIR)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _run_study(name, split, tmp_path):
    study = _study(name)
    protocol = study.PROTOCOLS["ci"]
    results = study.run(protocol, split, progress=False)
    # The report and the plot of the smallest form are written too, so the scripts cannot rot.
    text = study.report(results, protocol, "ci", split, 1.0)
    study.plot(results, tmp_path / "plot.png")
    assert text.startswith("# ") and (tmp_path / "plot.png").exists()
    return study, results, text


def _mean(result, method, point):
    values = [r["accuracy"] for r in result.rows if r["method"] == method and r["point"] == point]
    assert values, f"no rows for {method} at {point}"
    return 100 * sum(values) / len(values)


@pytest.mark.slow
def test_han_study_retraining_recovers_what_one_shot_pruning_loses(benchmark_split, tmp_path):
    study, results, text = _run_study("han_mnist", benchmark_split, tmp_path)
    result = results["lenet-300-100"]
    dense = 100 * result.dense_accuracy()[0]
    for retrained, oneshot in [
        (study.PAPER_ITERATIVE, study.PAPER_ONESHOT),
        (study.GLOBAL_ITERATIVE, study.GLOBAL_ONESHOT),
    ]:
        # Han et al. 2015: at 12×, prune-and-retrain keeps the dense accuracy; pruning alone does not.
        assert _mean(result, retrained, 12) >= dense - 1.0
        assert _mean(result, retrained, 12) >= _mean(result, oneshot, 12) + 0.5
    assert "12×" in text and "target" in text


@pytest.mark.slow
def test_shrinkbench_study_global_magnitude_beats_random_at_16x(benchmark_split, tmp_path):
    _, results, _ = _run_study("shrinkbench_sweep", benchmark_split, tmp_path)
    result = results["lenet-300-100"]
    assert _mean(result, "global magnitude", 16) >= _mean(result, "random", 16) + 2.0
    for row in result.rows:
        assert row["compression"] == pytest.approx(16.0, rel=1e-3)


@pytest.mark.slow
def test_lottery_study_tickets_beat_random_reinitialisation(benchmark_split, tmp_path):
    _, results, _ = _run_study("lottery_ticket", benchmark_split, tmp_path)
    result = results["lenet-300-100"]
    dense = 100 * result.dense_accuracy()[0]
    late = [p for p in result.points if p > max(result.points) - 5]
    gap = sum(_mean(result, "rewind to init", p) - _mean(result, "random reinit", p) for p in late) / len(late)
    assert gap >= 0.5, f"winning tickets lead random re-initialisation by only {gap:.2f} points"
    if data.mnist_files(MNIST_DIR) is not None:
        # Frankle & Carbin: on MNIST the rewound ticket still holds the dense accuracy at ~11% of the weights.
        # (On the digits fallback, ~1,400 training images at two epochs a round, it falls ~3 points short.)
        assert _mean(result, "rewind to init", max(result.points)) >= dense - 1.0
