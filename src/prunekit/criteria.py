"""Criteria: how important each weight is. Higher score = more worth keeping.

A criterion gives one score per weight (the weight's shape); the granularity then reduces the scores
of a unit with the criterion's ``reduce`` norm ("sum", i.e. the L1 norm of non-negative scores, or
"l2").

==============  =============================================================  ==================================
name            score of weight w                                              source
==============  =============================================================  ==================================
``magnitude``   \\|w\\| (units: L1 norm of the group)                            Han et al. 2015
``l2``          \\|w\\| (units: L2 norm of the group)                            Li et al. 2017 (filters by norm)
``gradient``    \\|Σ_b w·∂L_b/∂w\\|, first-order Taylor estimate of the loss     Molchanov et al. 2017/2019;
                change when w is removed, summed over batches b                  ShrinkBench's gradient magnitude
``movement``    −Σ_t w_t·∂L_t/∂w accumulated over training steps t: weights    Sanh, Wolf & Rush 2020
                moving away from zero score high
``random``      uniform in [0, 1), from a seeded generator                     baseline
a callable      ``fn(weight, module) -> Tensor`` (or ``fn(weight)``)           yours
==============  =============================================================  ==================================

``gradient`` and ``movement`` need gradients. Either pass the batches and the loss explicitly
(``data=`` an iterable of ``(inputs, targets)`` or dict batches, ``loss_fn=loss_fn(outputs, targets)``),
or use them in a :class:`~prunekit.Pruner` during training, where they accumulate the gradients of
your own backward passes. With neither, they raise a ``ValueError`` instead of pruning at random.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .targets import Target


class Criterion:
    """Base class for criteria; subclass and override :meth:`score` for your own."""

    name = "criterion"
    #: How a unit's score is formed from its members' scores: "sum" or "l2".
    reduce = "sum"

    def prepare(self, model: nn.Module, targets: list[Target]) -> None:
        """Called once before every pruning event, before any score is asked for."""

    def score(self, target: Target) -> torch.Tensor:
        """Scores of ``target``'s weights, a float tensor of the weight's shape."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called after every pruning event."""

    def observe(self, targets: list[Target]) -> list[Any]:
        """Start watching training (backward hooks); return removable handles."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return repr(self.name)


class Magnitude(Criterion):
    """|w| (Han et al. 2015); units are scored by the L1 norm of their weights."""

    name = "magnitude"

    def score(self, target):
        return target.param.detach().abs()


class L2Magnitude(Magnitude):
    """|w|; units are scored by the L2 norm of their weights (Li et al. 2017 use the L1 norm of filters)."""

    name = "l2"
    reduce = "l2"


class Random(Criterion):
    """Uniform random scores from a generator seeded with ``seed``: a baseline, reproducible run to run.

    Within one pruning event a weight keeps the same score however often it is asked for; every
    event draws new scores.
    """

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._event_seed = 0

    def prepare(self, model, targets):
        self._event_seed = int(torch.randint(1 << 62, (1,), generator=self.generator))

    def score(self, target):
        param = target.param
        layer_seed = (self._event_seed + zlib.crc32(target.full_name.encode())) % (1 << 63)
        return torch.rand(param.shape, generator=torch.Generator().manual_seed(layer_seed)).to(param.device)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        if "generator" in state:
            self.generator.set_state(state["generator"])


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


class _GradientProduct(Criterion):
    """Shared engine of gradient and movement: accumulates Σ w·∂L/∂w per weight."""

    reset_after_prune = True

    def __init__(self, data: Iterable | None = None, loss_fn: Callable | None = None):
        if (data is None) != (loss_fn is None):
            raise ValueError(f"criterion {self.name!r} takes data= and loss_fn= together (the batches and the loss)")
        self.data, self.loss_fn = data, loss_fn
        self.sums: dict[str, torch.Tensor] = {}
        self.batches_seen = 0

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
            self.sums, self.batches_seen = {}, 0
            self._from_data(model, targets)
        if self.batches_seen == 0:
            raise ValueError(
                f"criterion {self.name!r} needs gradients and has seen none: pass data= (batches) and "
                "loss_fn=, or prune from a pk.Pruner after backward passes"
            )

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
            self.sums, self.batches_seen = {}, 0

    def state_dict(self):
        return {"sums": {k: v.clone() for k, v in self.sums.items()}, "batches_seen": self.batches_seen}

    def load_state_dict(self, state):
        self.sums = {k: v.clone() for k, v in state.get("sums", {}).items()}
        self.batches_seen = state.get("batches_seen", 0)


class Gradient(_GradientProduct):
    """First-order Taylor importance |Σ_b w·∂L_b/∂w| (Molchanov et al. 2017).

    With ``data``/``loss_fn`` the sum runs over those batches at every pruning event; inside a
    :class:`~prunekit.Pruner` without data it runs over the training backward passes since the last
    pruning event.
    """

    name = "gradient"

    def score(self, target):
        return self._sum(target).abs()


class Movement(_GradientProduct):
    """Movement pruning (Sanh, Wolf & Rush 2020): S = −Σ_t w_t·∂L_t/∂w over all training steps.

    Weights that training pushes away from zero get high scores, whatever their magnitude. The sum is
    kept for the whole training (not reset between pruning events), as in the paper.
    """

    name = "movement"
    reset_after_prune = False

    def score(self, target):
        return -self._sum(target)


class Custom(Criterion):
    """Wrap a user function ``fn(weight, module) -> scores`` (a one-argument ``fn(weight)`` works too)."""

    def __init__(self, fn: Callable, reduce: str = "sum"):
        if reduce not in ("sum", "l2"):
            raise ValueError(f"reduce must be 'sum' or 'l2', got {reduce!r}")
        self.fn, self.reduce = fn, reduce
        self.name = getattr(fn, "__name__", "custom")
        # Builtins such as torch.abs have no readable signature; they take the weight alone.
        self._takes_module = _positional_arity(fn) not in (1, None)

    def score(self, target):
        weight = target.param.detach()
        scores = self.fn(weight, target.module) if self._takes_module else self.fn(weight)
        if not isinstance(scores, torch.Tensor):
            raise TypeError(
                f"criterion {self.name!r} must return a tensor, got {type(scores).__name__} for {target.full_name}"
            )
        if scores.shape != weight.shape:
            raise ValueError(
                f"criterion {self.name!r} returned scores of shape {tuple(scores.shape)} for {target.full_name}, "
                f"which has shape {tuple(weight.shape)}: return one score per weight"
            )
        return scores.detach().float()


def _positional_arity(fn: Callable) -> int | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


CRITERIA: dict[str, type[Criterion]] = {
    "magnitude": Magnitude,
    "l1": Magnitude,
    "l2": L2Magnitude,
    "gradient": Gradient,
    "taylor": Gradient,
    "movement": Movement,
    "random": Random,
}


def get_criterion(
    spec: str | Criterion | Callable, *, data: Iterable | None = None, loss_fn: Callable | None = None, seed: int = 0
) -> Criterion:
    """Build a criterion from a name, an instance or a callable; ``data``/``loss_fn`` feed gradient criteria."""
    if isinstance(spec, Criterion):
        return spec
    if isinstance(spec, str):
        cls = CRITERIA.get(spec)
        if cls is None:
            valid = ", ".join(repr(name) for name in CRITERIA)
            raise ValueError(
                f"unknown criterion {spec!r}; valid names are {valid}, or pass a function fn(weight, module)"
            )
        if issubclass(cls, _GradientProduct):
            return cls(data=data, loss_fn=loss_fn)
        if data is not None or loss_fn is not None:
            raise ValueError(
                f"criterion {spec!r} does not use data= or loss_fn=; drop them or use 'gradient'/'movement'"
            )
        return cls(seed=seed) if cls is Random else cls()
    if callable(spec):
        return Custom(spec)
    raise TypeError(f"criterion must be a name, a prunekit Criterion or a function, got {spec!r}")
