"""Pruning inside a Lightning ``Trainer`` (the ``lightning`` package; ``pytorch_lightning`` when only
that one is installed).

::

    from prunekit.integrations.lightning import PruningCallback

    trainer = L.Trainer(callbacks=[PruningCallback(sparsity=0.9, schedule=pk.Gradual(0, 1000, every=100))])
    trainer.fit(module)

The pruner is built when fitting starts (from the pruner's arguments, a recipe or a ready
``pruner=``) on the LightningModule, the Trainer's optimizers are attached, and ``pruner.step()`` runs
once per optimizer step as Lightning counts them (``trainer.global_step``): with
``accumulate_grad_batches=k`` once per k batches. The pruner's state is saved in every Lightning
checkpoint (the callback's state) and restored by ``trainer.fit(..., ckpt_path=...)``, so masks and
schedule continue exactly. The sparsity (fraction of the targeted weights that are zero) is logged as
``sparsity`` every ``trainer.log_every_n_steps`` optimizer steps and at every pruning event.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    from pytorch_lightning import Callback

from ..pruner import Pruner
from .common import STATE_KEY, PrunerSpec, catch_up


class PruningCallback(Callback):
    """Prune during ``Trainer.fit``; ``options`` are :class:`prunekit.Pruner`'s arguments.

    Args:
        recipe: a recipe (path, YAML text or dict, :mod:`prunekit.recipes`) instead of the arguments;
            ``options`` then override its values.
        pruner: a ready :class:`prunekit.Pruner` of the LightningModule instead of either.
    """

    def __init__(self, *, recipe: Any = None, pruner: Pruner | None = None, **options):
        self.spec = PrunerSpec(pruner, recipe, options)
        self.pruner: Pruner | None = pruner
        self._saved_state: dict[str, Any] | None = None
        self._sparsity: float | None = None

    @property
    def state_key(self) -> str:
        return STATE_KEY

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.pruner is None or self.pruner.model is not pl_module:
            self.pruner = self.spec.build(pl_module)
        if self._saved_state is not None:  # restored from a checkpoint before fitting started
            self.pruner.load_state_dict(self._saved_state)
            self._saved_state = None

    def on_train_start(self, trainer, pl_module) -> None:
        # The optimizers exist (and hold their restored state) by now.
        for optimizer in trainer.optimizers:
            self.pruner.attach_optimizer(optimizer)
        self._sparsity = self.pruner.sparsity

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        before = self.pruner.step_count
        if not catch_up(self.pruner, trainer.global_step):
            return  # a micro-batch of gradient accumulation: no optimizer step yet
        # Only a pruning event changes the sparsity, and counting it reads every mask: do it then, and
        # at logging steps.
        event = self.pruner.schedule.next_event(before - 1)
        every = max(int(getattr(trainer, "log_every_n_steps", 50) or 1), 1)
        if (
            self._sparsity is None
            or (event is not None and event <= self.pruner.step_count)
            or (self.pruner.step_count % every == 0)
        ):
            self._sparsity = self.pruner.sparsity
        pl_module.log("sparsity", self._sparsity, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.pruner is None else self.pruner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.pruner is not None:
            self.pruner.load_state_dict(state_dict)
        else:
            self._saved_state = dict(state_dict)
