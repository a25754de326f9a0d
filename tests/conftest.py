"""Shared fixtures for the prunekit tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from torch import nn

# CI (CI=true) draws the same examples every run, so a submission passes or fails reproducibly; local runs
# explore new examples each time.
settings.register_profile("prunekit", deadline=None, max_examples=50, derandomize=bool(os.environ.get("CI")))
settings.load_profile("prunekit")


def make_tiny_model(seed: int = 0) -> nn.Sequential:
    """Conv2d(3→4, 3×3) → ReLU → Flatten → Linear(4·6·6 → 5): takes (N, 3, 8, 8) inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )


@pytest.fixture
def tiny_model_factory():
    """A factory for small conv+linear models; the same seed gives the same weights."""
    return make_tiny_model


@pytest.fixture
def tiny_model() -> nn.Sequential:
    return make_tiny_model()
