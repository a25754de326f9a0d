"""The random criterion: seeded uniform scores, the baseline every method must beat."""

from __future__ import annotations

import zlib

import torch

from ...core.distributed import rank_zero_int
from .base import Criterion
from .registry import register_criterion


class Random(Criterion):
    """Uniform random scores from a generator seeded with ``seed``: a baseline, reproducible run to run.

    Under torch.distributed every rank uses rank 0's scores. Within one pruning event a weight keeps the same score however often it is asked for; every
    event draws new scores.
    """

    name = "random"
    options = ("seed",)

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._event_seed = 0

    def prepare(self, model, targets):
        # Under torch.distributed every rank takes rank 0's draw, so all ranks prune the same weights.
        self._event_seed = rank_zero_int(int(torch.randint(1 << 62, (1,), generator=self.generator)))

    def score(self, target):
        param = target.param
        layer_seed = (self._event_seed + zlib.crc32(target.full_name.encode())) % (1 << 63)
        return torch.rand(param.shape, generator=torch.Generator().manual_seed(layer_seed)).to(param.device)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        if "generator" in state:
            trial = torch.Generator()
            try:  # validate on a spare generator first, so a bad state changes nothing
                trial.set_state(state["generator"])
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"the saved state of criterion 'random' has a bad generator state: {error}") from None
            self.generator.set_state(state["generator"])


register_criterion("random", Random)
