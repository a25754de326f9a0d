"""layer_sparsity overrides are final values: a schedule ramps them like the global sparsity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 10))


def _layer_sparsity(model: nn.Module, name: str) -> float:
    weight = model.get_submodule(name).weight
    return float((weight == 0).float().mean())


def test_iterative_schedule_ramps_overrides_round_by_round():
    # Frankle & Carbin 2019: hidden layers lose 20% of what is left per round, the output layer 10%.
    rounds = 3
    schedule, final = pk.Iterative.per_round(0.2, rounds=rounds, start=1, every=1)
    model = _mlp()
    pruner = pk.Pruner(model, final, schedule=schedule, layer_sparsity={"4": 1 - 0.9**rounds})
    for done in range(1, rounds + 1):
        pruner.step()
        assert _layer_sparsity(model, "0") == pytest.approx(1 - 0.8**done, abs=1e-3)
        assert _layer_sparsity(model, "4") == pytest.approx(1 - 0.9**done, abs=3e-3)


def test_gradual_schedule_ramps_overrides_and_keeps_dense_layers_dense():
    model = _mlp()
    pruner = pk.Pruner(
        model,
        0.8,
        schedule=pk.Gradual(start=0, end=4, every=2, initial=0.5),
        layer_sparsity={"2": 0.4, "4": 0.0},
    )
    pruner.step()
    pruner.step()  # the event at step 2, halfway: s = s_f + (s_i − s_f)(1 − 1/2)³
    assert _layer_sparsity(model, "0") == pytest.approx(0.8 + (0.5 - 0.8) / 8, abs=1e-3)
    # The override (0.4) is below the schedule's initial sparsity (0.5): its ramp starts at 0.4 itself.
    assert _layer_sparsity(model, "2") == pytest.approx(0.4, abs=1e-3)
    assert _layer_sparsity(model, "4") == 0.0
    pruner.step()
    pruner.step()
    assert _layer_sparsity(model, "0") == pytest.approx(0.8, abs=1e-3)
    assert _layer_sparsity(model, "4") == 0.0


def test_explicit_prune_applies_overrides_in_full():
    model = _mlp()
    pruner = pk.Pruner(model, 0.9, schedule=pk.Iterative(start=10, end=20, rounds=2), layer_sparsity={"4": 0.5})
    pruner.prune(0.3)
    assert _layer_sparsity(model, "0") == pytest.approx(0.3, abs=1e-3)
    assert _layer_sparsity(model, "4") == pytest.approx(0.5, abs=1e-3)
