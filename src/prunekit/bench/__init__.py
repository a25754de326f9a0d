"""Benchmark harness: models, a training loop, sweeps over methods × compressions × seeds, and
their tables and plots (``pip install "prunekit[bench]"`` for the plots and progress bars).

::

    from prunekit import bench, data
    split = data.benchmark_split("path/to/mnist")          # or your own prunekit.data.Split
    result = bench.sweep(bench.LeNet300100, split, bench.SHRINKBENCH_METHODS, [1, 2, 4, 8, 16, 32, 64],
                         pretrain=bench.TrainConfig(epochs=20), finetune=bench.TrainConfig(epochs=5),
                         exclude=["fc3"])
    print(result.to_markdown()); result.plot("sweep.png")
"""

from .models import MODELS, LeNet5, LeNet300100
from .results import Aggregate, SweepResult
from .sweep import (
    LOTTERY_VARIANTS,
    SHRINKBENCH_METHODS,
    Method,
    lottery_ticket,
    prune_and_finetune,
    round_remaining,
    sparsity_for,
    sweep,
)
from .train import TrainConfig, evaluate, steps_per_epoch, train

__all__ = [
    "Aggregate",
    "LOTTERY_VARIANTS",
    "LeNet300100",
    "LeNet5",
    "MODELS",
    "Method",
    "SHRINKBENCH_METHODS",
    "SweepResult",
    "TrainConfig",
    "evaluate",
    "lottery_ticket",
    "prune_and_finetune",
    "round_remaining",
    "sparsity_for",
    "steps_per_epoch",
    "sweep",
    "train",
]
