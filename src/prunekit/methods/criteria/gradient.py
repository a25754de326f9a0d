"""Gradient criteria: first-order Taylor importance and movement, from w·∂L/∂w.

On a model sharded by FSDP2 each rank accumulates w·g for the rows it holds, where g is FSDP's
reduced gradient of its shard (the mean over the ranks) times the world size: the sum over the ranks'
batches, as the DistributedDataParallel path sums them. The product is read in a post-accumulate-grad
hook on the sharded parameter (FSDP calls it once the gradient is reduced); when gradients accumulate
over micro-batches without ``zero_grad`` in between, only the new part is added, which costs one copy
of each rank's gradient shard. ``data=`` batches run ``backward()`` (the sharded parameters are not in
the autograd graph), with the parameters' own gradients set aside and put back.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ...core.distributed import is_distributed, max_across_ranks, sum_across_ranks
from ...core.sharding import full_tensor, is_sharded, like_param, local_tensor
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
        #: FSDP2: per target, the gradient last read (a weak reference), its version and a copy of it.
        self._seen_grads: dict[str, tuple[weakref.ref, int, torch.Tensor]] = {}
        self._observing = False
        #: True while :meth:`_from_data` runs its batches (the training hooks must not count them twice).
        self._reading_data = False

    def _accumulate(self, target: Target, grad: torch.Tensor) -> None:
        total = self.sums.get(target.full_name)
        if total is None:
            total = self.sums[target.full_name] = torch.zeros_like(target.param, dtype=torch.float32)
        elif is_sharded(target.param) and not is_sharded(total):  # loaded whole from a state dict
            total = self.sums[target.full_name] = like_param(total, target.param)
        total.addcmul_(target.param.detach(), grad.detach())

    def observe(self, targets):
        def make_hook(target):
            def hook(grad):
                if self._reading_data:  # _from_data adds the gradients autograd.grad returns itself
                    return
                self._accumulate(target, grad)
                self.batches_seen += 1

            return hook

        def make_sharded_hook(target):
            def hook(param):
                self._accumulate(target, self._new_gradient(target.full_name, param))
                self.batches_seen += 1

            return hook

        self._observing = True
        return [
            t.param.register_post_accumulate_grad_hook(make_sharded_hook(t))
            if is_sharded(t.param)
            else t.param.register_hook(make_hook(t))
            for t in targets
            if t.param.requires_grad
        ]

    def _new_gradient(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """FSDP2: what the latest backward added to ``param.grad`` (a sharded mean over the ranks), times
        the world size. FSDP adds a micro-batch's gradient to an existing one in place (one version
        step); any other history (zeroed, clipped, replaced) means the gradient is new."""
        grad = param.grad.detach()
        version = local_tensor(grad)._version
        seen = self._seen_grads.get(name)
        increment = grad
        if seen is not None and seen[0]() is grad and version == seen[1] + 1:
            increment = grad - seen[2]
        self._seen_grads[name] = (weakref.ref(grad), version, grad.clone())
        return increment * param.device_mesh.size()

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
        # FSDP2's reduced gradients already hold every rank's batches; only replicated weights are summed.
        targets = [t for t in targets if not is_sharded(t.param)]
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
        if any(is_sharded(p) for p in params):
            self._from_data_sharded(model)
            return
        # Running the batches must not change the model: BatchNorm statistics and the like are restored.
        saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        self._reading_data = True
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
            self._reading_data = False
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    if name in saved_buffers:
                        buffer.copy_(saved_buffers[name])

    def _from_data_sharded(self, model: nn.Module) -> None:
        """FSDP2: run ``backward()`` on every batch; the hooks of :meth:`observe` add each gradient as
        FSDP reduces it. Every rank must pass as many batches (each backward is a collective)."""
        if not self._observing:
            raise RuntimeError(f"criterion {self.name!r} scores sharded weights only inside a pk.Pruner")
        saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        saved_grads = {param: param.grad for param in model.parameters()}
        try:
            for param in saved_grads:
                param.grad = None
            with torch.enable_grad():
                for batch in self.data:
                    _run_model(model, batch, self.loss_fn).backward()
                    for param in saved_grads:
                        param.grad = None
                    self.batches_seen += 1
        finally:
            self._seen_grads.clear()
            with torch.no_grad():
                for param, grad in saved_grads.items():
                    param.grad = grad
                for name, buffer in model.named_buffers():
                    if name in saved_buffers:
                        buffer.copy_(saved_buffers[name])

    def _sum(self, target: Target) -> torch.Tensor:
        """The sums of ``target``'s weights, whole (gathered, when sharded by FSDP2)."""
        total = self.sums.get(target.full_name)
        if total is None:
            return torch.zeros(target.param.shape, dtype=torch.float32, device=target.param.device)
        return full_tensor(total)

    def finish(self):
        if self.reset_after_prune and self.data is None:
            self.sums, self.batches_seen, self._agreed = {}, 0, {}
            self._seen_grads.clear()

    def state_dict(self):
        # FSDP2: sums are gathered whole (every rank calls this), so they load sharded or not.
        return {"sums": {k: full_tensor(v).clone() for k, v in self.sums.items()}, "batches_seen": self.batches_seen}

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
