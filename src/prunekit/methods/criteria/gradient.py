"""Gradient criteria: first-order Taylor importance and movement, from w·∂L/∂w."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ...core.distributed import is_distributed, max_across_ranks, sum_across_ranks
from ...core.targets import Target
from .base import Criterion
from .registry import register_criterion


def _run_model(model: nn.Module, batch: Any, loss_fn: Callable) -> torch.Tensor:
    if isinstance(batch, dict):
        return loss_fn(model(**batch), batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = batch
        outputs = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
        return loss_fn(outputs, labels)
    raise TypeError(
        "each batch in data= must be an (inputs, targets) pair or a dict of model keyword arguments, "
        f"got {type(batch).__name__}"
    )


class GradientProduct(Criterion):
    """Shared engine of gradient and movement: accumulates Σ w·∂L/∂w per weight."""

    reset_after_prune = True
    options = ("data", "loss_fn")
    needs_gradients = True

    def __init__(self, data: Iterable | None = None, loss_fn: Callable | None = None):
        if (data is None) != (loss_fn is None):
            raise ValueError(f"criterion {self.name!r} takes data= and loss_fn= together (the batches and the loss)")
        self.data, self.loss_fn = data, loss_fn
        self.sums: dict[str, torch.Tensor] = {}
        self.batches_seen = 0
        #: Under torch.distributed, the part of ``sums`` every rank already shares (see _agree_across_ranks).
        self._agreed: dict[str, torch.Tensor] = {}

    def _accumulate(self, target: Target, grad: torch.Tensor) -> None:
        total = self.sums.get(target.full_name)
        if total is None:
            total = self.sums[target.full_name] = torch.zeros_like(target.param, dtype=torch.float32)
        total.addcmul_(target.param.detach(), grad.detach())

    def observe(self, targets):
        def make_hook(target):
            def hook(grad):
                self._accumulate(target, grad)
                self.batches_seen += 1

            return hook

        return [t.param.register_hook(make_hook(t)) for t in targets if t.param.requires_grad]

    def prepare(self, model, targets):
        if self.data is not None:
            self.sums, self.batches_seen, self._agreed = {}, 0, {}
            self._from_data(model, targets)
        self._agree_across_ranks(targets)
        if self.batches_seen == 0:
            raise ValueError(
                f"criterion {self.name!r} needs gradients and has seen none: pass data= (batches) and "
                "loss_fn=, or prune from a pk.Pruner after backward passes"
            )

    def _agree_across_ranks(self, targets: list[Target]) -> None:
        """Under torch.distributed, add up what every rank accumulated from its own batches since the
        sums last agreed, so all ranks score (and mask) alike. Only the new part is summed: the sums
        kept across events (movement) would otherwise be counted once per rank again at every event."""
        if not is_distributed():
            return
        agreed = [self._agreed.get(t.full_name) for t in targets]
        deltas = [self._sum(t) - (0 if a is None else a) for t, a in zip(targets, agreed)]
        sum_across_ranks(deltas)
        for target, before, delta in zip(targets, agreed, deltas):
            total = delta if before is None else before + delta
            self.sums[target.full_name] = total
            self._agreed[target.full_name] = total.clone()
        self.batches_seen = max_across_ranks(self.batches_seen)

    def _from_data(self, model: nn.Module, targets: list[Target]) -> None:
        params = [t.param for t in targets]
        frozen = [t.full_name for t in targets if not t.param.requires_grad]
        if frozen:
            raise ValueError(
                f"criterion {self.name!r} needs gradients, but these weights have requires_grad=False: {frozen}"
            )
        # Running the batches must not change the model: BatchNorm statistics and the like are restored.
        saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        try:
            with torch.enable_grad():
                for batch in self.data:
                    loss = _run_model(model, batch, self.loss_fn)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    for target, grad in zip(targets, grads):
                        if grad is not None:
                            self._accumulate(target, grad)
                    self.batches_seen += 1
        finally:
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    if name in saved_buffers:
                        buffer.copy_(saved_buffers[name])

    def _sum(self, target: Target) -> torch.Tensor:
        total = self.sums.get(target.full_name)
        return torch.zeros_like(target.param, dtype=torch.float32) if total is None else total

    def finish(self):
        if self.reset_after_prune and self.data is None:
            self.sums, self.batches_seen, self._agreed = {}, 0, {}

    def state_dict(self):
        return {"sums": {k: v.clone() for k, v in self.sums.items()}, "batches_seen": self.batches_seen}

    def load_state_dict(self, state):
        sums, seen = state.get("sums", {}), state.get("batches_seen", 0)
        if not isinstance(sums, dict) or not all(isinstance(v, torch.Tensor) for v in sums.values()):
            raise ValueError(f"the saved state of criterion {self.name!r} has no valid gradient sums")
        if isinstance(seen, bool) or not isinstance(seen, int) or seen < 0:
            raise ValueError(f"the saved state of criterion {self.name!r} has a bad batch count {seen!r}")
        self.sums = {k: v.clone() for k, v in sums.items()}
        self.batches_seen = seen
        # Every rank loads the same saved sums, so they are shared from here on.
        self._agreed = {k: v.clone() for k, v in sums.items()} if is_distributed() else {}


class Gradient(GradientProduct):
    """First-order Taylor importance |Σ_b w·∂L_b/∂w| (Molchanov et al. 2017).

    With ``data``/``loss_fn`` the sum runs over those batches at every pruning event; inside a
    :class:`~prunekit.Pruner` without data it runs over the training backward passes since the last
    pruning event.
    """

    name = "gradient"

    def score(self, target):
        return self._sum(target).abs()


class Movement(GradientProduct):
    """Movement pruning (Sanh, Wolf & Rush 2020): S = −Σ_t w_t·∂L_t/∂w over all training steps.

    Weights that training pushes away from zero get high scores, whatever their magnitude. The sum is
    kept for the whole training (not reset between pruning events), as in the paper.
    """

    name = "movement"
    reset_after_prune = False

    def score(self, target):
        return -self._sum(target)


register_criterion("gradient", Gradient)
register_criterion("taylor", Gradient)
register_criterion("movement", Movement)
