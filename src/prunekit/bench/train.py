"""A small, deterministic training loop for the benchmarks: in-memory tensors, seeded batch order.

Budgets are in **epochs** (passes over the training set, fractions allowed); the pruner's schedules
count **optimizer steps**, and :func:`steps_per_epoch` converts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..data import Split


@dataclass(frozen=True)
class TrainConfig:
    """How to train: ``epochs`` over the training set, mini-batches of ``batch_size``, ``optimizer``
    ``"adam"`` or ``"sgd"`` (momentum ``momentum``), learning rate ``lr`` held constant or, with
    ``lr_decay="cosine"``, annealed to 0 over the run (lr_t = lr·(1 + cos(π t / T))/2), L2 ``weight_decay``."""

    epochs: float
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_decay: str = "none"

    def __post_init__(self):
        if not self.epochs >= 0:
            raise ValueError(f"epochs must be ≥ 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.lr_decay not in ("none", "cosine"):
            raise ValueError(f"lr_decay must be 'none' or 'cosine', got {self.lr_decay!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def scaled(self, epochs: float | None = None, lr_factor: float = 1.0) -> TrainConfig:
        """The same settings with another number of epochs and/or the learning rate times ``lr_factor``."""
        return replace(self, epochs=self.epochs if epochs is None else epochs, lr=self.lr * lr_factor)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def steps_per_epoch(data: Split, batch_size: int) -> int:
    """Optimizer steps in one epoch (the last, partial batch is dropped)."""
    return max(1, len(data.y_train) // batch_size)


def total_steps(data: Split, config: TrainConfig) -> int:
    return math.ceil(config.epochs * steps_per_epoch(data, config.batch_size))


def train(
    model: nn.Module,
    data: Split,
    config: TrainConfig,
    seed: int,
    after_step: Callable[[int], None] | None = None,
    progress=None,
    steps: int | None = None,
) -> None:
    """Train ``model`` on ``data.x_train`` for ``config.epochs`` epochs, or ``steps`` optimizer steps
    if given (cross-entropy loss).

    The batch order comes from ``seed`` alone. ``after_step(step)`` is called after every optimizer
    step (1-based), e.g. ``lambda _: pruner.step()``; ``progress`` is a tqdm bar to advance per step.
    """
    optimizer = config.make_optimizer(model)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = steps_per_epoch(data, config.batch_size)
    steps = total_steps(data, config) if steps is None else steps
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    order = torch.randperm(len(data.y_train), generator=generator)
    for step in range(steps):
        position = (step % per_epoch) * config.batch_size
        if step and position == 0:
            order = torch.randperm(len(data.y_train), generator=generator)
        index = order[position : position + config.batch_size]
        if config.lr_decay == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = config.lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(data.x_train[index]), data.y_train[index]).backward()
        optimizer.step()
        if after_step is not None:
            after_step(step + 1)
        if progress is not None:
            progress.update()
    model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Accuracy of ``model`` on (x, y) as a fraction in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(y), batch_size)
    )
    model.train(was_training)
    return correct / len(y)


def gradient_batches(data: Split, batches: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` seeded mini-batches of training data, for the gradient criteria's scores."""
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    return [
        (data.x_train[order[i : i + batch_size]], data.y_train[order[i : i + batch_size]])
        for i in range(0, min(batches * batch_size, len(order)), batch_size)
    ]
