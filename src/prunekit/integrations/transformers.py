"""Pruning inside a Hugging Face ``transformers.Trainer``.

::

    from prunekit.integrations.transformers import PruningCallback

    callback = PruningCallback(sparsity=0.9, schedule=pk.Gradual(0, 1000, every=100))   # or recipe="r.yaml"
    Trainer(model, args, train_dataset=..., callbacks=[callback]).train()

The pruner is built when training begins (from the pruner's arguments, a recipe or a ready
``pruner=``), the Trainer's optimizer is attached (Accelerate's ``AcceleratedOptimizer`` is unwrapped),
and ``pruner.step()`` runs once per optimizer step: with ``gradient_accumulation_steps=k``, once per
k batches. Every checkpoint folder gets ``prunekit_pruner.pt`` (masks, schedule position, criterion
state); ``trainer.train(resume_from_checkpoint=...)`` restores it, so masks and schedule continue
exactly. The sparsity (fraction of the targeted weights that are zero) is added to the Trainer's logs
as ``sparsity``; reporting callbacks the Trainer set up itself (``report_to``) run before user
callbacks, so to have them report it, insert the callback first:
``trainer.callback_handler.callbacks.insert(0, callback)``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback

from ..pruner import Pruner
from .common import STATE_KEY, PrunerSpec, catch_up

STATE_FILE = STATE_KEY + ".pt"


class PruningCallback(TrainerCallback):
    """Prune during ``Trainer.train()``; ``options`` are :class:`prunekit.Pruner`'s arguments.

    Args:
        recipe: a recipe (path, YAML text or dict, :mod:`prunekit.recipes`) instead of the arguments;
            ``options`` then override its values.
        pruner: a ready :class:`prunekit.Pruner` of the trained model instead of either.
        resume_from: the checkpoint folder to restore the pruner from when training resumes; by default
            the Trainer's own ``output_dir/checkpoint-<global step>``.
    """

    def __init__(self, *, recipe: Any = None, pruner: Pruner | None = None, resume_from: str | None = None, **options):
        self.spec = PrunerSpec(pruner, recipe, options)
        self.resume_from = resume_from
        self.pruner: Pruner | None = pruner

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.pruner is None or self.pruner.model is not model:
            self.pruner = self.spec.build(model)
        if state.global_step > 0:
            self._restore(args, state)
        if optimizer is not None:
            self.pruner.attach_optimizer(optimizer)

    def _restore(self, args, state) -> None:
        folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"training resumes at step {state.global_step} but {path} holds no pruner state; pass "
                "PruningCallback(resume_from=<the checkpoint folder>)"
            )
        self.pruner.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        if self.pruner.step_count != state.global_step:
            raise ValueError(
                f"the pruner state in {path} is at step {self.pruner.step_count}, the Trainer at {state.global_step}"
            )

    def on_step_end(self, args, state, control, **kwargs):
        catch_up(self.pruner, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # every rank holds the same masks (prunekit.core.distributed)
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.pruner.state_dict(), os.path.join(folder, STATE_FILE))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.pruner is not None:
            logs["sparsity"] = self.pruner.sparsity
            if state.log_history:
                state.log_history[-1]["sparsity"] = logs["sparsity"]
