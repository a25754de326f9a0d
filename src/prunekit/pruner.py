"""The pruner: composes a criterion, a granularity, a scope and a schedule, and keeps masks enforced.

:class:`Pruner` is a thin facade. It validates its arguments into configuration objects
(:mod:`prunekit.core.config`), steps the schedule, and delegates: an engine turns the configuration and
the scores into masks (:mod:`prunekit.engines.unstructured` per layer, :mod:`prunekit.engines.coupled`
for dependency groups), constraints cut them (:mod:`prunekit.engines.constraints`), and the enforcer
stores and applies them and hooks optimizers (:mod:`prunekit.engines.enforcement`). :func:`prune` is
the one-shot shortcut. Both validate everything before they touch the model, so a call that raises
leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import checks
from .assembly import assemble
from .core import masks as mask_store
from .core.config import StructuredOptions
from .core.distributed import unwrap_data_parallel
from .core.sharding import check_shardable, local_rows
from .core.targets import LayerSelector, Target
from .core.validation import check_whole
from .engines.calibration import collect_statistics
from .engines.constraints import apply_constraints
from .engines.counting import unit_sparsity, weight_sparsity
from .engines.persistence import read_state, write_state
from .engines.sharding import whole_weights
from .fhe.budget import AccumulatorBudget
from .methods.constraints import Constraint
from .methods.criteria import Criterion
from .methods.granularity import Granularity, final_sparsity
from .methods.schedules import Schedule
from .recipes import config_to_recipe, load_recipe
from .structure.cost import UnitCosts
from .structure.units import removed_units
from .summary import weight_applications


class Pruner:
    """Prune ``model`` to ``sparsity`` following a schedule, and keep the pruned weights at zero.

    Args:
        model: any ``nn.Module``; its Linear and Conv weights are pruned unless ``include``/``exclude``
            say otherwise (other layer types: :func:`prunekit.register_layer`). A
            ``DistributedDataParallel`` (or ``DataParallel``) model is unwrapped: the pruner prunes its
            ``.module``, layer names carry no ``module.`` prefix, and under ``torch.distributed``
            data-dependent scores are summed over the ranks so every rank gets the same masks
            (:mod:`prunekit.core.distributed`). An FSDP2 model (``fully_shard``) is pruned as if
            unsharded, each rank keeping the masks of its rows (:mod:`prunekit.engines.sharding`).
        sparsity: final fraction of units to prune, in [0, 1) (0.9 = 90%). Not needed with ``pk.NM``.
        criterion: ``"magnitude"`` (L1), ``"l2"``, ``"gradient"``, ``"movement"``, ``"random"``, any name
            registered with :func:`prunekit.register_criterion`, a :class:`~prunekit.Criterion` or a
            function ``fn(weight, module) -> scores``.
        granularity: ``"weight"``, ``"kernel"``, ``"out_channel"``, ``"in_channel"``, ``"2:4"`` (N:M),
            ``pk.Block(h, w)`` or ``pk.NM(n, m)``.
        scope: ``"local"`` (every layer to the same sparsity), ``"global"`` (one threshold for all layers
            not listed in ``layer_sparsity``) or ``"row"`` (every output row of every layer to the same
            sparsity, as Wanda compares scores).
        schedule: ``pk.OneShot``, ``pk.Iterative`` or ``pk.Gradual``; default ``pk.OneShot(at=0)``.
        layer_sparsity: ``{name pattern: sparsity}`` overrides, pruned on their own (0.0 leaves a layer
            dense); the first matching pattern wins.
        include / exclude: module types or name patterns choosing the layers (:mod:`prunekit.core.targets`).
        min_kept: units every layer keeps whatever the scope says (default 1).
        example_inputs: a tensor, tuple or dict the model accepts, used by :meth:`summary` to count MACs
            and, with ``granularity="out_channel"``, to trace which channels are coupled.
        coupled / prune_outputs / round_to / max_layer_sparsity / sparsity_in / prune_only: options of
            coupled structured pruning (``granularity="out_channel"`` with ``example_inputs``; see
            :class:`prunekit.core.config.StructuredOptions` and the README); setting one in another mode
            is an error.
        data / loss_fn: batches and loss for the gradient criteria (see :mod:`prunekit.methods.criteria`).
        calibration: batches the model accepts, for criteria that read activation statistics (they are
            collected at every pruning event, :mod:`prunekit.engines.calibration`).
        optimizer: a training optimizer (or a framework's wrapper of one) to attach (:meth:`attach_optimizer`).
        mask_gradients: with attached optimizers, also zero the gradients of pruned weights before each step.
        seed: seed of the ``"random"`` criterion.
        max_fan_in: FHE accumulator budget: at most this many non-zero weights in every output neuron, a
            whole number such as ``pk.fhe.max_fan_in(2, 2, 16)`` or a ``pk.fhe.AccumulatorBudget``
            (:mod:`prunekit.fhe.fan_in`); ``sparsity`` may then be left out.
        constraints: more :class:`~prunekit.Constraint` objects every mask must meet.

    Masks only grow: a pruned unit stays pruned until :meth:`remove`.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float | None = None,
        *,
        criterion: str | Criterion | Callable = "magnitude",
        granularity: str | Granularity = "weight",
        scope: str = "local",
        schedule: Schedule | None = None,
        layer_sparsity: Mapping[str, float] | None = None,
        include: LayerSelector | Iterable[LayerSelector] | None = None,
        exclude: LayerSelector | Iterable[LayerSelector] | None = None,
        min_kept: int = 1,
        example_inputs: Any = None,
        coupled: bool = True,
        prune_outputs: bool = False,
        round_to: int = 1,
        max_layer_sparsity: float = 1.0,
        sparsity_in: str = "channels",
        prune_only: str | None = None,
        data: Iterable | None = None,
        loss_fn: Callable | None = None,
        calibration: Iterable | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        seed: int | None = None,
        mask_gradients: bool = False,
        max_fan_in: int | AccumulatorBudget | None = None,
        constraints: Sequence[Constraint] = (),
    ):
        model = unwrap_data_parallel(model)  # DDP / DataParallel: prune the inner module (names without "module.")
        sharded = check_shardable(model)  # FSDP1 and unusual DTensor placements are refused here
        parts = assemble(
            model, sparsity, criterion=criterion, granularity=granularity, scope=scope, schedule=schedule,
            layer_sparsity=layer_sparsity, include=include, exclude=exclude, min_kept=min_kept,
            example_inputs=example_inputs, structured=StructuredOptions(
                coupled, prune_outputs, round_to, max_layer_sparsity, sparsity_in, prune_only
            ), data=data, loss_fn=loss_fn, calibration=calibration, seed=seed, mask_gradients=mask_gradients,
            max_fan_in=max_fan_in, constraints=constraints, optimizer=optimizer,
        )  # fmt: skip
        self.model, self.example_inputs, self.calibration = model, example_inputs, calibration
        self.granularity, self.criterion, self.scope, self.schedule = (
            parts.granularity,
            parts.criterion,
            parts.scope,
            parts.schedule,
        )
        self.sparsity_target, self.min_kept, self.targets = parts.sparsity, parts.min_kept, parts.targets
        self.constraints, self.dependencies, self.engine = parts.constraints, parts.dependencies, parts.engine
        self.config, self.enforcer, self._maskable = parts.config, parts.enforcer, parts.maskable
        self.step_count, self._last_event = 0, -1
        #: FSDP2: the parameters are DTensors sharded on dim 0 (see prunekit.engines.sharding).
        self.sharded = sharded
        self._rewind_step: int | None = None
        self._rewind_state: dict[str, torch.Tensor] | None = None
        self._removed = False
        # Validation is over: from here on the pruner hooks into the model.
        self._handles = self.criterion.observe(self.targets)
        if parts.optimizer is not None:
            self.attach_optimizer(parts.optimizer)

    # ------------------------------------------------------------------ recipes

    @classmethod
    def from_recipe(cls, model: nn.Module, recipe: Any, **overrides: Any) -> Pruner:
        """Build a pruner from a recipe (a YAML file, YAML text or a dict of pruner arguments; see
        :mod:`prunekit.recipes`); ``overrides`` are more keyword arguments (``optimizer=``,
        ``example_inputs=``, ...) or replace the recipe's values."""
        arguments = load_recipe(recipe).pruner_arguments()
        arguments.update(overrides)
        sparsity = arguments.pop("sparsity", None)
        return cls(model, sparsity, **arguments)

    def to_recipe(self) -> str:
        """This pruner's configuration as recipe YAML; :meth:`from_recipe` on it builds the same pruner."""
        return config_to_recipe(self.config).to_yaml()

    # ------------------------------------------------------------------ masks

    def _keep_of(self, target: Target) -> torch.Tensor | None:
        return self.enforcer.keep(target.module, target.param_name, target.full_name)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{"<layer>.weight": bool keep-mask}`` for every masked parameter (True = kept)."""
        return self.enforcer.masks()

    def apply_masks(self) -> None:
        """Zero every pruned weight in place (:meth:`step` does this; call it after editing weights yourself)."""
        self._check_alive()
        self.enforcer.apply()

    @property
    def unit_sparsity(self) -> float:
        """Fraction of the targeted units that are pruned now, units as the granularity counts them
        (channels for ``"out_channel"``, blocks, weights for ``"weight"``; dependency groups' units with
        coupled structured pruning). :attr:`sparsity` counts weights."""
        return unit_sparsity(self.targets, self.granularity, self.dependencies)

    @property
    def sparsity(self) -> float:
        """Fraction of the targeted weights that are pruned now (weights, biases not counted; see
        :attr:`unit_sparsity` for units). On an FSDP2 model it counts every rank's shards (an
        all-reduce: read it on every rank)."""
        return weight_sparsity(self.targets)

    # ------------------------------------------------------------------ optimizers

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep pruned weights at zero through ``optimizer``'s steps (several may be attached; a
        framework's wrapper, such as Accelerate's, is unwrapped). The masks are re-applied right after
        each ``optimizer.step()``; its state (momentum, Adam moments) is zeroed at pruned entries now,
        whenever masks change and on :meth:`remove`. With ``mask_gradients=True`` the gradients of
        pruned weights are also zeroed before each step (after the closure, for optimizers such as LBFGS)."""
        self._check_alive()
        self.enforcer.attach(optimizer)

    def detach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop watching ``optimizer`` (to replace it with a fresh one, e.g. after a pruning round)."""
        self._check_alive()
        self.enforcer.detach(optimizer)

    # ------------------------------------------------------------------ schedule

    def step(self) -> None:
        """Call once after every optimizer step: re-applies the masks, advances the schedule, and
        prunes when a pruning event is due (events missed in between are caught up at once)."""
        self._check_alive()
        self.enforcer.after_training_step()
        self.step_count += 1
        if self._rewind_step == self.step_count and self._rewind_state is None:
            self._record_rewind_point()
        due = self._due_event()
        if due is not None:
            self._prune_to(self.schedule.sparsity_at(due, self.sparsity_target), due, scheduled_at=due)

    def _due_event(self) -> int | None:
        due, step = None, self.schedule.next_event(self._last_event)
        while step is not None and step <= self.step_count:
            due, step = step, self.schedule.next_event(step)
        return due

    def prune(self, sparsity: float | None = None) -> None:
        """Prune now: to ``sparsity`` (a fraction in [0, 1)) if given, else to what the schedule asks
        for at the current step (the final sparsity for ``pk.OneShot(at=0)``)."""
        self._check_alive()
        if sparsity is None:
            due = self._due_event()
            at = self.step_count if due is None else due
            self._prune_to(self.schedule.sparsity_at(at, self.sparsity_target), due, scheduled_at=at)
        else:
            self._prune_to(final_sparsity(sparsity, self.granularity), None)

    def _prune_to(self, sparsity: float, event: int | None, scheduled_at: int | None = None) -> None:
        if not self.sharded:
            self._check_finite()
        if self.criterion.statistics and self.calibration is not None:
            self.criterion.use_statistics(
                collect_statistics(self.model, self.targets, self.calibration, self.criterion.statistics)
            )
        self.criterion.prepare(self.model, self.targets)
        caching = self.enforcer.caching
        # FSDP2: the event sees the pruned weights whole (all-gathered), so masks are chosen as without
        # sharding; each rank keeps its rows of them on the way out (prunekit.engines.sharding).
        with whole_weights(self._maskable, self.enforcer.forget) if self.sharded else contextlib.nullcontext():
            if self.sharded:
                self._check_finite()
            update = self.engine.compute(sparsity, scheduled_at)
            apply_constraints(
                update, self.constraints, self.targets, self.criterion, self.schedule, scheduled_at,
                self._keep_of, self.granularity.prunes_bias,
            )  # fmt: skip
            # Everything below mutates the model; all validation is done.
            with torch.no_grad():
                self.enforcer.install(update, cache=caching and not self.sharded)
        with torch.no_grad():
            if self._rewind_state is not None:
                self.model.load_state_dict(self._rewind_state, strict=False)
                self.enforcer.apply()
                self.enforcer.reset_optimizer_state()
        self.enforcer.clear_optimizer_state()
        if event is not None:
            self._last_event = event
        self.criterion.finish()

    def _check_finite(self) -> None:
        touched = [(t.full_name, t.param) for t in self.targets]
        touched += [(full, getattr(module, name)) for module, name, full in self._maskable]
        if self.dependencies is not None:  # running statistics too: compaction slices them
            touched += [(piece.full_name, piece.tensor) for piece in self.dependencies.slices]
        checks.check_finite({id(tensor): (name, tensor) for name, tensor in touched}.values())

    # ------------------------------------------------------------------ lottery tickets

    def rewind_to(self, step: int = 0) -> None:
        """Record the model's parameters and buffers when ``step`` optimizer steps are done (now if
        ``step`` is the current step); after every later pruning event the surviving weights are reset
        to those values (Frankle & Carbin 2019: step 0; Frankle et al. 2020, "Linear Mode Connectivity
        and the Lottery Ticket Hypothesis": an early step). The attached optimizers' state is cleared
        at each rewind. For learning-rate rewinding (Renda et al. 2020) do not call this; instead
        restart your learning-rate schedule after each pruning event.
        """
        self._check_alive()
        step = check_whole(step, "step", "optimizer steps")
        if step < self.step_count:
            raise ValueError(
                f"cannot rewind to step {step}: training is already at step {self.step_count}; "
                "call rewind_to before that step is reached"
            )
        self._rewind_step, self._rewind_state = step, None
        if step == self.step_count:
            self._record_rewind_point()

    def _record_rewind_point(self) -> None:
        self._rewind_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: masks (bit-packed), step, schedule position, criterion state
        (movement scores, random generator), the rewind point and the configuration. Save it next to
        ``model.state_dict()``. On an FSDP2 model the masks and gradient sums are gathered whole (call
        it on every rank), so the state loads into a sharded or an unsharded pruner alike."""
        return write_state(
            self._maskable, self.config, self.step_count, self._last_event, self.criterion.state_dict(),
            self._rewind_step, self._rewind_state,
        )  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any], *, check_config: bool = True) -> None:
        """Restore what :meth:`state_dict` saved and zero the pruned weights; load the model's own weights
        first (``model.load_state_dict``), then this. A state saved by a pruner of another
        configuration is refused with the differing fields named (``check_config=False`` loads it
        anyway). Everything is validated first: a refused state changes nothing."""
        self._check_alive()
        saved = read_state(state, self._maskable, self.config, check_config, set(self.model.state_dict()))
        self.criterion.load_state_dict(saved.criterion)  # validates before it changes anything
        with torch.no_grad():
            for module, param_name, _ in self._maskable:
                mask_store.remove_mask(module, param_name)
            self.enforcer.forget()
            for module, param_name, keep in saved.masks.values():
                param = getattr(module, param_name)  # FSDP2: the saved mask is whole; keep this rank's rows
                mask_store.set_mask(module, param_name, local_rows(keep, param).contiguous().to(param.device))
        self.step_count, self._last_event = saved.step, saved.last_event
        self._rewind_step, self._rewind_state = saved.rewind_step, saved.rewind_state
        self.enforcer.clear_optimizer_state()

    # ------------------------------------------------------------------ ending

    def remove(self) -> nn.Module:
        """Stop pruning: drop hooks and masks, leaving a plain model whose pruned weights are zeros.
        The attached optimizers' state is zeroed at pruned entries one last time. Returns the model."""
        self._check_alive()
        self.enforcer.clear_optimizer_state()
        self.enforcer.apply()
        self._unhook()
        self.enforcer.detach_all()
        self.enforcer.remove_all()
        self._removed = True
        return self.model

    def mark_pruned(self) -> None:
        """Record that the one-shot event has happened outside the pruner (a calibrated method such as
        SparseGPT stored the masks and changed the weights): :meth:`step` will not prune again, and the
        attached optimizers forget their state at the pruned entries."""
        self._check_alive()
        self._last_event = max(self._last_event, 0)
        self.enforcer.forget()
        self.enforcer.clear_optimizer_state()

    def abandon(self) -> None:
        """Drop this pruner's hooks after a failed one-shot call, leaving the masks as they are."""
        self._unhook()
        self.enforcer.detach_all()

    def _unhook(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _check_alive(self) -> None:
        if self._removed:
            raise RuntimeError("this pruner was removed (pruner.remove()); create a new pk.Pruner to prune again")

    def summary(self):
        """:func:`prunekit.summary` of the model, using this pruner's ``example_inputs``; with coupled
        structured pruning, a note says what the sparsity counted and what removing the pruned units
        saves in parameters and MACs (what :func:`prunekit.compact` will deliver)."""
        from .summary import summary

        report = summary(self.model, example_inputs=self.example_inputs)
        if self.dependencies is not None:
            options = self.engine.options
            pruned = removed_units(self.dependencies)
            costs = UnitCosts(self.model, self.dependencies, weight_applications(self.model, self.example_inputs))
            only = "" if options.prune_only is None else f", {options.prune_only} only"
            report.notes.append(
                f"structured sparsity {self.sparsity_target:g} counts {options.sparsity_in}{only}: "
                f"{int(pruned.sum())} of {self.dependencies.num_units} units removed; once compacted, "
                f"{costs.removed_fraction(pruned, 'params'):.1%} fewer parameters and "
                f"{costs.removed_fraction(pruned, 'macs'):.1%} fewer Conv/Linear MACs"
            )
        return report

    def __repr__(self) -> str:
        return (
            f"Pruner(sparsity={self.sparsity_target}, criterion={self.criterion!r}, granularity={self.granularity!r}, "
            f"scope={self.scope!r}, schedule={self.schedule!r}, layers={len(self.targets)}, step={self.step_count})"
        )

    def __deepcopy__(self, memo):
        raise TypeError("a Pruner is tied to its model; deepcopy the model and build a new pk.Pruner for the copy")
