"""Factories and a calibration criterion that tests/test_cli_prune.py's command lines import by name."""

import torch
from torch import nn

import prunekit as pk


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def make_broken():
    raise RuntimeError("this factory is broken\nsecond line")


@pk.register_criterion("input_energy")
class InputEnergy(pk.Criterion):
    """|w| · ‖x_j‖₂ over the calibration tokens (Wanda's score, Sun et al. 2023)."""

    name = "input_energy"
    statistics = ("input_sq_norm",)

    def score(self, target):
        return target.scoring_weight().abs() * self.calibration_statistics[target.full_name]["input_sq_norm"].sqrt()
