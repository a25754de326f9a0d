"""The pruner: composes a criterion, a granularity, a scope and a schedule, and keeps masks enforced.

:class:`Pruner` is used during training (call :meth:`Pruner.step` after every optimizer step);
:func:`prune` is the one-shot shortcut. Both validate everything before they touch the model, so a
call that raises leaves the model exactly as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from functools import cached_property
from typing import Any

import torch
from torch import nn

from . import masks as mask_store
from .compact import removed_units
from .criteria import Criterion, Custom, L2Magnitude, Magnitude, get_criterion
from .fhe.budget import AccumulatorBudget
from .fhe.fan_in import FanInConstraint
from .granularity import NM, Granularity, OutChannel, Weight, get_granularity
from .schedules import OneShot, Schedule
from .selection import _runs_of, find_cut
from .structure.cost import MEASURES, UnitCosts, search_sparsity
from .structure.dependencies import ChannelDependencies, trace_dependencies
from .structure.units import choose_units, unit_keep_masks, unit_scores
from .targets import (
    LayerSelector,
    Target,
    _preview,
    check_sparsity,
    find_targets,
    name_matches,
    resolve_layer_sparsity,
)

SCOPES = ("local", "global")
#: Which units coupled structured pruning may remove (None: all of them).
PRUNE_ONLY = (None, "heads", "width")
_STATE_VERSION = 1


class Pruner:
    """Prune ``model`` to ``sparsity`` following a schedule, and keep the pruned weights at zero.

    Args:
        model: any ``nn.Module``; its Linear and Conv weights are pruned unless ``include``/``exclude`` say otherwise.
        sparsity: final fraction of units to prune, in [0, 1) (0.9 = 90%). Not needed with ``pk.NM``.
        criterion: ``"magnitude"`` (L1), ``"l2"``, ``"gradient"``, ``"movement"``, ``"random"``, a
            :class:`~prunekit.criteria.Criterion` or a function ``fn(weight, module) -> scores``.
        granularity: ``"weight"``, ``"kernel"``, ``"out_channel"``, ``"in_channel"``, ``pk.Block(h, w)`` or ``pk.NM(n, m)``.
        scope: ``"local"`` (every layer pruned to the same sparsity) or ``"global"`` (one threshold for
            all layers not listed in ``layer_sparsity``).
        schedule: ``pk.OneShot``, ``pk.Iterative`` or ``pk.Gradual``; default ``pk.OneShot(at=0)``.
        layer_sparsity: ``{name pattern: sparsity}`` overrides; those layers are pruned on their own
            (0.0 leaves a layer dense). The first matching pattern wins.
        include / exclude: module types or name patterns choosing the layers (see :mod:`prunekit.targets`).
        min_kept: units every layer keeps whatever the scope says (default 1), so no layer is ever
            emptied and no path through the network is cut.
        example_inputs: a tensor, tuple or dict the model accepts, used by :meth:`summary` to count MACs
            and, with ``granularity="out_channel"``, to trace which channels are coupled.
        coupled: with ``granularity="out_channel"`` and ``example_inputs`` (default True), prune whole
            dependency groups (:mod:`prunekit.structure`): every filter, bias, norm entry and input column
            of a removed channel is masked together across residual adds, concats, grouped convs and
            attention heads, so :func:`prunekit.compact` can remove them exactly. ``coupled=False``
            prunes each layer's filters on its own (masks only). Sparsity then counts units (coupled
            channel groups), ``layer_sparsity`` patterns name the layer that produces a group.
        prune_outputs: let coupled pruning remove channels that reach a model output (default False:
            a classifier keeps its classes, an encoder its hidden size).
        round_to: with coupled pruning, keep every layer's channel count a multiple of this (8 or 16
            suit fast kernels), by pruning a little less.
        max_layer_sparsity: with coupled pruning, the largest fraction of any one family of units (the
            channels one layer produces) that may go, whatever the global ranking says (default 1.0).
        sparsity_in: with coupled pruning, what ``sparsity`` is a fraction of: ``"channels"`` (default:
            units, i.e. coupled channels, neurons and heads), ``"params"`` (the model's parameters) or
            ``"macs"`` (the Conv/Linear MACs :func:`prunekit.summary` counts for ``example_inputs``).
            Units are still ranked by score; the pruner removes the fewest of them whose removal saves
            at least that fraction (see :mod:`prunekit.structure.cost`). Since a conv between two pruned
            layers loses rows and columns, a channel fraction p saves about 1 − (1 − p)² of a conv
            stack's parameters. ``layer_sparsity`` overrides stay fractions of each layer's channels.
        prune_only: with coupled pruning, ``"heads"`` removes only attention heads (units coupled by
            an activation × activation product, q·kᵀ and softmax·v) and ``"width"`` only the other
            units (MLP neurons, conv channels, the hidden size where allowed); default None: both.
        data / loss_fn: batches and loss for the gradient criteria (see :mod:`prunekit.criteria`).
        optimizer: the training optimizer; attaching it re-applies the masks right after each of its
            steps and clears its state at pruned entries (see :meth:`attach_optimizer`).
        mask_gradients: with an attached optimizer, also zero the gradients of pruned weights just
            before each step, so its state stays zero at pruned entries at all times (default False:
            one pass over the weights per step is cheaper, and on CPUs Adam runs slower on moments
            that are exactly zero).
        seed: seed of the ``"random"`` criterion.
        max_fan_in: FHE accumulator budget (issue #5): at most this many non-zero weights in every
            output neuron, a whole number such as ``pk.fhe.max_fan_in(2, 2, 16)`` or a
            ``pk.fhe.AccumulatorBudget``; combines with ``sparsity`` (the stricter wins per neuron),
            which may then be left out, and tightens with the schedule (see :mod:`prunekit.fhe.fan_in`).

    How masks are enforced: with an attached optimizer, the masks are re-applied right after each
    ``optimizer.step()`` and its state (momentum, Adam moments) is zeroed at pruned entries whenever
    masks change and on :meth:`remove`, so nothing comes back. Without one, :meth:`step` re-applies
    the masks after your optimizer step. Masks only grow: a pruned unit stays pruned until :meth:`remove`.
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
        optimizer: torch.optim.Optimizer | None = None,
        seed: int = 0,
        mask_gradients: bool = False,
        max_fan_in: int | AccumulatorBudget | None = None,
    ):
        self.granularity = get_granularity(granularity)
        # FHE (issue #5): the per-neuron fan-in cap, applied after selection in _compute_masks.
        self.fan_in = None if max_fan_in is None else FanInConstraint(max_fan_in)
        fan_in_only = sparsity is None and self.fan_in is not None and not isinstance(self.granularity, NM)
        self.sparsity_target = 0.0 if fan_in_only else _final_sparsity(sparsity, self.granularity)
        self.criterion = get_criterion(criterion, data=data, loss_fn=loss_fn, seed=seed)
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; valid scopes are {', '.join(map(repr, SCOPES))}")
        self.scope = scope
        schedule = OneShot(at=0) if schedule is None else schedule
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be pk.OneShot, pk.Iterative or pk.Gradual, got {schedule!r}")
        if schedule.initial > self.sparsity_target:
            raise ValueError(
                f"the schedule starts at sparsity {schedule.initial} above the final sparsity {self.sparsity_target}"
            )
        self.schedule = schedule
        if isinstance(min_kept, bool) or not isinstance(min_kept, int) or min_kept < 0:
            raise ValueError(f"min_kept must be a whole number of units ≥ 0, got {min_kept!r}")
        self.min_kept = min_kept
        self.model = model
        self.targets: list[Target] = find_targets(model, include, exclude)
        self.layer_sparsity = resolve_layer_sparsity(self.targets, layer_sparsity)
        for target in self.targets:
            self.granularity.validate(target)
        if self.fan_in is not None:
            self.fan_in.validate(self.targets, self.granularity)
        if isinstance(self.granularity, NM) and any(v != 0.0 for v in self.layer_sparsity.values()):
            raise ValueError("with pk.NM a layer_sparsity override can only be 0.0 (leave that layer dense)")
        self.example_inputs = example_inputs
        self.mask_gradients = bool(mask_gradients)
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be a whole number of channels ≥ 1, got {round_to!r}")
        self.round_to = round_to
        self.max_layer_sparsity = (
            1.0 if max_layer_sparsity == 1.0 else check_sparsity(max_layer_sparsity, "max_layer_sparsity")
        )
        if sparsity_in not in MEASURES:
            raise ValueError(f"unknown sparsity_in {sparsity_in!r}; valid values are {', '.join(map(repr, MEASURES))}")
        if prune_only not in PRUNE_ONLY:
            raise ValueError(f"unknown prune_only {prune_only!r}; valid values are {', '.join(map(repr, PRUNE_ONLY))}")
        self.sparsity_in, self.prune_only = sparsity_in, prune_only
        self.dependencies: ChannelDependencies | None = None
        self._costs: UnitCosts | None = None
        if coupled and isinstance(self.granularity, OutChannel) and example_inputs is not None:
            self.dependencies = trace_dependencies(model, example_inputs, exclude=exclude, prune_outputs=prune_outputs)
            self._family_sparsity = self._resolve_family_sparsity(layer_sparsity or {})
            if prune_only == "heads" and not bool(self.dependencies.unit_is_head.any()):
                raise ValueError(
                    "prune_only='heads', but this model has no attention heads that can be removed "
                    "(none found, or all of them reach an output or an excluded module); use prune_only=None"
                )
        elif sparsity_in != "channels" or prune_only is not None:
            raise ValueError(
                "sparsity_in and prune_only apply to coupled structured pruning only: use "
                "granularity='out_channel' with example_inputs (and coupled=True)"
            )

        self.step_count = 0
        self._last_event = -1
        self._rewind_step: int | None = None
        self._rewind_state: dict[str, torch.Tensor] | None = None
        self._keep_cache: dict[str, torch.Tensor] = {}
        self._enforced: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._handles: list[Any] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._removed = False
        self._maskable_params = self._list_maskable()

        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        # Validation is over: from here on the pruner hooks into the model.
        self._handles += self.criterion.observe(self.targets)
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    # ------------------------------------------------------------------ masks

    def _list_maskable(self) -> list[tuple[nn.Module, str, str]]:
        """(module, parameter name, full name) of every parameter this pruner may mask."""
        if self.dependencies is not None:
            unique = {}
            for piece in self.dependencies.slices:
                if piece.tensor_name in piece.module._parameters:
                    unique.setdefault(piece.full_name, (piece.module, piece.tensor_name, piece.full_name))
            return list(unique.values())
        found = []
        for target in self.targets:
            found.append((target.module, target.param_name, target.full_name))
            if self.granularity.prunes_bias and target.bias is not None:
                found.append((target.module, target.bias_name, target.name_of(target.bias_name)))
        return found

    def _enforced_masks(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every masked parameter and its keep-mask's bytes read as uint8 (1 = kept; a view of the
        cached bool mask, see :func:`prunekit.masks.zero_pruned`), built once per mask change."""
        if self._enforced is None:
            params, byte_masks = [], []
            for module, param_name, full_name in self._maskable_params:
                keep = self._keep(module, param_name, full_name)
                if keep is not None:
                    params.append(getattr(module, param_name))
                    byte_masks.append(keep.view(torch.uint8))
            self._enforced = (params, byte_masks)
        return self._enforced

    def _keep(self, module: nn.Module, param_name: str, full_name: str) -> torch.Tensor | None:
        """The bool keep-mask, unpacked once and cached while masks are being enforced."""
        keep = self._keep_cache.get(full_name)
        if keep is None:
            keep = mask_store.get_mask(module, param_name)
            if keep is not None:
                self._keep_cache[full_name] = keep
        return keep

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{"<layer>.weight": bool keep-mask}`` for every masked parameter (True = kept)."""
        found = {}
        for module, param_name, full_name in self._maskable_params:
            keep = mask_store.get_mask(module, param_name)
            if keep is not None:
                found[full_name] = keep
        return found

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every pruned weight in place (:meth:`step` does this; call it after editing weights yourself)."""
        self._check_alive()
        params, byte_masks = self._enforced_masks()
        if params:
            # One foreach call for all of them: on a small network the Python of a loop over layers
            # costs as much as the products themselves.
            torch._foreach_mul_(params, byte_masks)

    @torch.no_grad()
    def _mask_gradients(self) -> None:
        for param, byte_mask in zip(*self._enforced_masks()):
            if param.grad is not None:
                param.grad.mul_(byte_mask)

    @property
    def sparsity(self) -> float:
        """Fraction of the targeted weights that are pruned now (biases not counted)."""
        total = pruned = 0
        for target in self.targets:
            total += target.param.numel()
            keep = mask_store.get_mask(target.module, target.param_name)
            if keep is not None:
                pruned += keep.numel() - int(keep.sum())
        return pruned / total

    # ------------------------------------------------------------------ optimizer

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep pruned weights at zero through ``optimizer``'s steps.

        The masks are re-applied right after each ``optimizer.step()``, whatever the optimizer; its
        state (momentum buffers, Adam moments) is zeroed at pruned entries now, whenever masks change
        and on :meth:`remove`. With ``mask_gradients=True`` the gradients of pruned weights are also
        zeroed before each step (after the closure, for optimizers that take one, such as LBFGS), so
        with zero gradient and zero state the optimizer never moves a pruned weight in the first place.
        """
        self._check_alive()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._optimizer is not None:
            raise ValueError("an optimizer is already attached to this pruner")
        self._optimizer = optimizer
        if self.mask_gradients:
            self._handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply_masks()))
        self._clear_optimizer_state()

    def _before_optimizer_step(self, optimizer, args, kwargs):
        # torch passes step's own arguments, the optimizer first: (optimizer, closure?).
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._mask_gradients()
            return None

        # Optimizers such as LBFGS compute gradients inside step(), through the closure.
        def masked_closure():
            loss = closure()
            self._mask_gradients()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": masked_closure}
        return (args[0], masked_closure, *args[2:]), kwargs

    @torch.no_grad()
    def _clear_optimizer_state(self) -> None:
        if self._optimizer is None:
            return
        for module, param_name, full_name in self._maskable_params:
            param = getattr(module, param_name)
            keep = self._keep(module, param_name, full_name)
            state = self._optimizer.state.get(param)
            if keep is None or not state:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    mask_store.zero_pruned(value, keep)

    # ------------------------------------------------------------------ schedule

    def step(self) -> None:
        """Call once after every optimizer step: re-applies the masks, advances the schedule, and
        prunes when a pruning event is due (events missed in between are caught up at once)."""
        self._check_alive()
        if self._optimizer is None:
            self.apply_masks()
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
            self._prune_to(_final_sparsity(sparsity, self.granularity), None)

    def _prune_to(self, sparsity: float, event: int | None, scheduled_at: int | None = None) -> None:
        new_masks, magnitude_cuts = self._compute_masks(sparsity, scheduled_at)
        # Everything below mutates the model; all validation is done.
        with torch.no_grad():
            caching = bool(self._keep_cache)
            self._enforced = None
            # Unless the bool masks are kept for training, unpack each into one reused buffer.
            largest = max((8 * p.numel() for p in new_masks.values()), default=0)
            buffer = None if caching or largest < 1 << 16 else torch.empty(largest, dtype=torch.uint8)
            for (module, param_name, full_name), packed in new_masks.items():
                param = getattr(module, param_name)
                out = buffer if buffer is not None and buffer.device == packed.device else None
                keep = mask_store.unpack_mask(packed, param.shape, out=out)
                mask_store.set_mask(module, param_name, keep, packed)
                self._keep_cache.pop(full_name, None)
                if caching:
                    self._keep_cache[full_name] = keep
            self._apply_magnitude_cuts(magnitude_cuts, caching)
            if self._rewind_state is not None:
                self.model.load_state_dict(self._rewind_state, strict=False)
                self.apply_masks()
                if self._optimizer is not None:
                    self._optimizer.state.clear()
        self._clear_optimizer_state()
        if event is not None:
            self._last_event = event
        self.criterion.finish()

    def _apply_magnitude_cuts(self, magnitude_cuts: dict, caching: bool) -> None:
        """Prune the weights whose new mask is "|w| > t, plus the protected units" (see
        :meth:`_compute_masks`): zero them in one fused pass, then pack the mask from the result."""
        largest = max((getattr(m, p).numel() for m, p, _ in magnitude_cuts), default=0)
        buffers = _Buffers(largest if largest >= 1 << 16 else 0)
        for (module, param_name, full_name), (threshold, protected) in magnitude_cuts.items():
            param = getattr(module, param_name)
            packed, keep = mask_store.prune_magnitude(
                param.detach(), threshold, protected, buffers.flags, buffers.words
            )
            mask_store.store_packed(module, param_name, packed)
            self._keep_cache.pop(full_name, None)
            if caching:
                self._keep_cache[full_name] = keep.clone().view(param.shape)

    # ------------------------------------------------------------------ mask computation

    def _compute_masks(self, sparsity: float, scheduled_at: int | None = None) -> tuple[dict, dict]:
        """New keep-masks; the model is not touched. With ``scheduled_at`` (a step), ``layer_sparsity``
        overrides and the fan-in cap follow the schedule too (None: their final values).

        Returns ``(masks, magnitude_cuts)``. masks: ``{(module, param_name, full_name): bit-packed mask}``
        for every parameter whose mask changes, except those in magnitude_cuts, whose new mask is
        "|w| > t, plus the protected units" as ``{key: (t, protected positions or None)}``: for those,
        zeroing the weights first and reading the mask off them is cheaper than building it here."""
        self._check_finite()
        self.criterion.prepare(self.model, self.targets)
        result: dict[tuple[nn.Module, str, str], torch.Tensor] = {}
        magnitude_cuts: dict[tuple[nn.Module, str, str], tuple[float, torch.Tensor | None]] = {}
        if self.dependencies is not None:
            return self._coupled_masks(sparsity, scheduled_at), magnitude_cuts
        for layers, layer_sparsity in self._selection_groups(sparsity, scheduled_at):
            if isinstance(self.granularity, NM):
                for target in layers:
                    self._add_mask(result, target, self._nm_keep(target, layer_sparsity))
                continue
            sizes = [_num_units(self.granularity, t) for t in layers]
            score_fns = [self._score_fn(t) for t in layers]
            cut = find_cut(score_fns, sizes, round(layer_sparsity * sum(sizes)), self.min_kept)
            # Reused buffers for large groups: fresh memory per layer would be page-faulted every time.
            buffers = _Buffers(max(sizes) if sum(sizes) > 1 << 20 else 0)
            for i, target in enumerate(layers):
                signed, above = score_fns[i].signed_scores, cut.keeps_above(i)
                if signed is not None and above is not None and above >= 0:
                    protected = cut.protected[i]
                    if self.fan_in is None:  # nothing will look at this mask before it is applied
                        magnitude_cuts[(target.module, target.param_name, target.full_name)] = (above, protected)
                        continue
                    packed = mask_store.pack_magnitude_above(
                        signed, above, protected, buffers.scores, buffers.flags, buffers.words
                    )
                    self._add_packed_mask(result, target, packed)
                    continue
                units = cut.keep(i, score_fns[i](buffers.scores))
                self._add_mask(result, target, self.granularity.expand(units, target.oik_shape))
        if self.fan_in is not None:
            self.fan_in.apply(self, result, scheduled_at)
        return result, magnitude_cuts

    def _resolve_family_sparsity(self, overrides: Mapping[str, float]) -> dict[int, float]:
        """layer_sparsity patterns, matched against the module producing each family of units."""
        found: dict[int, float] = {}
        used = set()
        for index, name in enumerate(self.dependencies.families):
            module_name = name.rpartition(".")[0]
            for pattern, value in overrides.items():
                if name_matches(pattern, module_name):
                    found[index] = check_sparsity(value, f"layer_sparsity[{pattern!r}]")
                    used.add(pattern)
                    break
        unused = [p for p in overrides if p not in used]
        if unused:
            raise ValueError(
                f"layer_sparsity patterns {unused} match no layer whose channels can be pruned; "
                f"the layers producing prunable channels are: {_preview(self.dependencies.families)}"
            )
        return found

    def _coupled_masks(
        self, sparsity: float, scheduled_at: int | None = None
    ) -> dict[tuple[nn.Module, str, str], torch.Tensor]:
        """Masks for coupled structured pruning: whole dependency groups (see :mod:`prunekit.structure`)."""
        deps = self.dependencies
        by_name = {t.full_name: t for t in self.targets}
        if type(self.criterion) is L2Magnitude:
            # Squares of |w| are squares of w: the L2 norms need no |w| copy of every weight.
            element_scores = {name: (lambda t=t: t.param.detach()) for name, t in by_name.items()}
        else:
            element_scores = {name: (lambda t=t: self.criterion.score(t)) for name, t in by_name.items()}
        scores = unit_scores(deps, element_scores, self.criterion.reduce)
        if torch.isnan(scores).any():
            raise ValueError(f"criterion {self.criterion.name!r} gave NaN scores")
        num_families = len(deps.families)
        pooled = torch.full((num_families,), self.scope == "global", dtype=torch.bool)
        overrides = {}
        for index, value in self._family_sparsity.items():
            if scheduled_at is not None:  # an override is the family's final sparsity, ramped by the schedule
                value = self.schedule.sparsity_at(scheduled_at, value, min(self.schedule.initial, value))
            overrides[index], pooled[index] = value, False
        already = removed_units(deps)
        allowed = None
        if self.prune_only is not None:
            allowed = deps.unit_is_head if self.prune_only == "heads" else ~deps.unit_is_head

        def choose(unit_sparsity: float) -> torch.Tensor:
            family_sparsity = torch.full((num_families,), float(unit_sparsity), dtype=torch.float64)
            for index, value in overrides.items():
                family_sparsity[index] = value
            if allowed is None:
                return choose_units(scores, deps.unit_family, family_sparsity, pooled, already, *self._unit_limits())
            # Rank only the allowed units; the others keep their state (pruned only if already pruned).
            pruned = already.clone()
            pruned[allowed] = choose_units(
                scores[allowed], deps.unit_family[allowed], family_sparsity, pooled, already[allowed],
                *self._unit_limits(),
            )  # fmt: skip
            return pruned

        if self.sparsity_in == "channels":
            pruned = choose(sparsity)
        else:
            costs = self._unit_costs()
            pruned = search_sparsity(choose, lambda units: costs.removed_fraction(units, self.sparsity_in), sparsity)
        result = {}
        modules = {full: (module, param) for module, param, full in self._maskable_params}
        for full_name, keep in unit_keep_masks(deps, pruned).items():
            module, param_name = modules[full_name]
            self._record_packed(result, module, param_name, full_name, mask_store.pack_mask(keep))
        return result

    def _unit_limits(self) -> tuple[int, int, float]:
        return self.min_kept, self.round_to, self.max_layer_sparsity

    def _unit_costs(self) -> UnitCosts:
        """Parameter and MAC counts per set of removed units, built once (MACs need one forward pass)."""
        if self._costs is None:
            from .summary import weight_applications

            applied = weight_applications(self.model, self.example_inputs) if self.sparsity_in == "macs" else None
            self._costs = UnitCosts(self.model, self.dependencies, applied)
        return self._costs

    def _selection_groups(self, sparsity: float, scheduled_at: int | None = None) -> list[tuple[list[Target], float]]:
        """Which layers are ranked together, and at which sparsity: each on its own (local scope,
        ``layer_sparsity`` overrides) or all the rest together (global scope). Layers at 0 are skipped.

        An override is the layer's *final* sparsity: at a scheduled event (``scheduled_at``) the layer
        gets what the schedule asks for at that step with the override as its final value, so an
        iterative or gradual schedule ramps every layer (Han et al. 2015 prune each layer to its own
        ratio over the rounds; Frankle & Carbin 2019 prune the output layer at half the rate)."""
        groups, pool = [], []
        for target in self.targets:
            own = self.layer_sparsity.get(target.name)
            if own is not None and scheduled_at is not None:
                own = self.schedule.sparsity_at(scheduled_at, own, min(self.schedule.initial, own))
            if own is None and self.scope == "global" and not isinstance(self.granularity, NM):
                pool.append(target)
            else:
                groups.append(([target], sparsity if own is None else own))
        if pool:
            groups.append((pool, sparsity))
        return [(layers, value) for layers, value in groups if value > 0]

    def _add_mask(self, result: dict, target: Target, keep_oik: torch.Tensor) -> None:
        """Record the weight's new mask and, when units are whole outputs, its bias's."""
        self._add_packed_mask(result, target, mask_store.pack_mask(target.from_oik(keep_oik)))
        bias = target.bias
        if self.granularity.prunes_bias and bias is not None and bias.numel() == keep_oik.shape[0]:
            bias_keep = keep_oik.reshape(keep_oik.shape[0], -1).any(dim=1)
            self._add_packed_mask(result, target, mask_store.pack_mask(bias_keep), target.bias_name)

    def _add_packed_mask(self, result: dict, target: Target, packed: torch.Tensor, param_name: str = "") -> None:
        """Record a bit-packed mask for the target's weight (or ``param_name``), intersected with the
        one already there, since masks only grow."""
        param_name = param_name or target.param_name
        self._record_packed(result, target.module, param_name, target.name_of(param_name), packed)

    @staticmethod
    def _record_packed(result: dict, module: nn.Module, param_name: str, full_name: str, packed: torch.Tensor) -> None:
        """Record ``module.<param_name>``'s new packed mask, intersected with its old one (masks only grow)."""
        old = module._buffers.get(mask_store.mask_buffer_name(param_name))
        if old is not None:
            packed &= old.to(packed.device)
        result[(module, param_name, full_name)] = packed.to(getattr(module, param_name).device)

    def _check_finite(self) -> None:
        for target in self.targets:
            weight = target.param.detach()
            # A sum is a cheap test; only when it is not finite is the exact (slower) test needed.
            if not math.isfinite(float(weight.sum())) and not bool(torch.isfinite(weight).all()):
                raise ValueError(
                    f"layer {target.name!r} has NaN or inf weights; fix the model (or exclude the layer) before pruning"
                )

    def _score_fn(self, target: Target) -> _LayerScores:
        return _LayerScores(self, target)

    def _alive_units(self, target: Target) -> torch.Tensor | None:
        """Flat bool per unit: True where any weight of the unit is still kept; None if never pruned."""
        keep = self._keep(target.module, target.param_name, target.full_name)
        if keep is None:
            return None
        if isinstance(self.granularity, Weight):
            return target.to_oik(keep).reshape(-1)
        return self.granularity.unit_scores(target.to_oik(keep.float()), "sum").reshape(-1) > 0

    def _nm_keep(self, target: Target, sparsity: float) -> torch.Tensor:
        nm = self.granularity
        prune_per_group = min(int(math.floor(sparsity * nm.m + 1e-9)), nm.m - nm.n)
        scores = target.to_oik(self.criterion.score(target).float())
        old = self._keep(target.module, target.param_name, target.full_name)
        if old is not None:
            scores = scores.masked_fill(~target.to_oik(old), -math.inf)
        return nm.group_keep(scores, prune_per_group)

    # ------------------------------------------------------------------ lottery tickets

    def rewind_to(self, step: int = 0) -> None:
        """Record the model's parameters and buffers when ``step`` optimizer steps are done (now if
        ``step`` is the current step); after every later pruning event the surviving weights are reset
        to those values (Frankle & Carbin 2019: step 0; Frankle et al. 2020, "Linear Mode Connectivity
        and the Lottery Ticket Hypothesis": an early step). The attached optimizer's state is cleared
        at each rewind. For learning-rate rewinding (Renda et al. 2020) do not call this; instead
        restart your learning-rate schedule after each pruning event.
        """
        self._check_alive()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a whole number of optimizer steps ≥ 0, got {step!r}")
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
        (movement scores, random generator) and the rewind point. Save it next to ``model.state_dict()``."""
        masks = {}
        for module, param_name, full_name in self._maskable_params:
            packed = module._buffers.get(mask_store.mask_buffer_name(param_name))
            if packed is not None:
                masks[full_name] = packed.clone()
        return {
            "version": _STATE_VERSION,
            "step": self.step_count,
            "last_event": self._last_event,
            "masks": masks,
            "shapes": {name: tuple(getattr(m, p).shape) for m, p, name in self._maskable_params if name in masks},
            "criterion": self.criterion.state_dict(),
            "rewind_step": self._rewind_step,
            "rewind_state": self._rewind_state,
            "config": {
                "sparsity": self.sparsity_target,
                "criterion": self.criterion.name,
                "granularity": self.granularity.name,
                "scope": self.scope,
                "sparsity_in": self.sparsity_in,
                "prune_only": self.prune_only,
                "schedule": repr(self.schedule),
                "max_fan_in": repr(self.fan_in),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks and schedule position saved by :meth:`state_dict`; zeroes the pruned weights.

        Load the model's own weights first (``model.load_state_dict``), then this.
        """
        self._check_alive()
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise ValueError("not a prunekit Pruner state_dict (missing or unknown 'version')")
        known = {full_name: (module, param_name) for module, param_name, full_name in self._maskable_params}
        unpacked = {}
        for full_name, packed in state["masks"].items():
            if full_name not in known:
                raise ValueError(
                    f"the saved masks name {full_name!r}, which this pruner does not prune; "
                    "build the pruner with the same model, include/exclude and granularity"
                )
            module, param_name = known[full_name]
            shape = getattr(module, param_name).shape
            saved_shape = tuple(state.get("shapes", {}).get(full_name, shape))
            if saved_shape != tuple(shape) or packed.numel() != (math.prod(shape) + 7) // 8:
                raise ValueError(
                    f"the saved mask of {full_name!r} has shape {saved_shape}, but that parameter has shape "
                    f"{tuple(shape)}; load it into a pruner built on the same architecture"
                )
            unpacked[full_name] = (module, param_name, mask_store.unpack_mask(packed.cpu(), shape))
        with torch.no_grad():
            for module, param_name, _ in self._maskable_params:
                mask_store.remove_mask(module, param_name)
            self._keep_cache.clear()
            self._enforced = None
            for module, param_name, keep in unpacked.values():
                mask_store.set_mask(module, param_name, keep.to(getattr(module, param_name).device))
        self.step_count = int(state["step"])
        self._last_event = int(state["last_event"])
        self.criterion.load_state_dict(state.get("criterion", {}))
        self._rewind_step = state.get("rewind_step")
        rewind = state.get("rewind_state")
        self._rewind_state = None if rewind is None else {k: v.clone() for k, v in rewind.items()}
        self._clear_optimizer_state()

    # ------------------------------------------------------------------ ending

    def remove(self) -> nn.Module:
        """Stop pruning: drop hooks and masks, leaving a plain model whose pruned weights are zeros.

        The attached optimizer's state is zeroed at pruned entries one last time. Returns the model.
        """
        self._check_alive()
        self._clear_optimizer_state()
        self.apply_masks()
        self._unhook()
        for module, param_name, _ in self._maskable_params:
            mask_store.remove_mask(module, param_name)
        self._keep_cache.clear()
        self._enforced = None
        self._removed = True
        return self.model

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
        from .summary import summary, weight_applications

        report = summary(self.model, example_inputs=self.example_inputs)
        if self.dependencies is not None:
            pruned = removed_units(self.dependencies)
            costs = UnitCosts(self.model, self.dependencies, weight_applications(self.model, self.example_inputs))
            only = "" if self.prune_only is None else f", {self.prune_only} only"
            report.notes.append(
                f"structured sparsity {self.sparsity_target:g} counts {self.sparsity_in}{only}: "
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


class _LayerScores:
    """One target's flat unit scores for :func:`prunekit.selection.find_cut`: already-pruned units
    score −inf, and the tensor returned is the caller's to modify (never a view of the weight)."""

    def __init__(self, pruner: Pruner, target: Target):
        self.target, self.criterion, self.granularity = target, pruner.criterion, pruner.granularity
        self.n_units = _num_units(self.granularity, target)
        #: Units are the weights themselves, in the weight's own memory order.
        self.in_weight_order = isinstance(self.granularity, Weight) and not target.transposed
        self.direct_magnitude = type(self.criterion) in (Magnitude, L2Magnitude) and self.in_weight_order
        self.alive = pruner._alive_units(target)

    @property
    def device(self) -> torch.device:
        """Where the scores are computed: the weight's device."""
        return self.target.param.device

    @cached_property
    def signed_scores(self) -> torch.Tensor | None:
        """The flat float32 weight when the scores are exactly its absolute values (magnitude per
        weight, none pruned yet), which lets selection and masking use fused ops on it; else None."""
        param = self.target.param
        if not self.direct_magnitude or self.alive is not None or param.dtype != torch.float32:
            return None
        if not param.is_contiguous():  # pruning it in place goes through its flat view
            return None
        return param.detach().reshape(-1)

    def __call__(self, out: torch.Tensor | None) -> torch.Tensor:
        if self.direct_magnitude:
            flat = self.target.param.detach().reshape(-1)
            usable = out is not None and out.device == flat.device and flat.dtype == torch.float32
            units = torch.abs(flat, out=out[: self.n_units]) if usable else flat.abs().float()
        else:
            element = self.criterion.score(self.target)
            if isinstance(self.criterion, Custom):
                element = element.clone()
            if not isinstance(self.criterion, Magnitude) and torch.isnan(element).any():
                raise ValueError(f"criterion {self.criterion.name!r} gave NaN scores for {self.target.full_name}")
            units = self.granularity.unit_scores(self.target.to_oik(element.float()), self.criterion.reduce)
            units = units.reshape(-1)
        if self.alive is not None:
            units.masked_fill_(~self.alive, -math.inf)
        return units

    def runs(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """Scores of the ``length`` consecutive units from each of these flat positions, run after run."""
        if not self.direct_magnitude:
            return _runs_of(self(None), starts, length)
        units = _runs_of(self.target.param.detach().reshape(-1), starts, length).abs().float()
        if self.alive is not None:
            units.masked_fill_(~_runs_of(self.alive, starts, length), -math.inf)
        return units


class _Buffers:
    """Scratch buffers for building the masks of layers up to ``size`` units, reused layer after
    layer and each allocated when first used; all None when ``size`` is 0 (small models, where
    fresh memory costs nothing)."""

    def __init__(self, size: int):
        self.size = size

    @cached_property
    def scores(self) -> torch.Tensor | None:
        return torch.empty(self.size) if self.size else None

    @cached_property
    def flags(self) -> torch.Tensor | None:
        return torch.empty(self.size, dtype=torch.bool) if self.size else None

    @cached_property
    def words(self) -> torch.Tensor | None:
        return torch.empty((self.size + 7) // 8, dtype=torch.int64) if self.size else None


def _num_units(granularity: Granularity, target: Target) -> int:
    out_dim, in_dim, kernel = target.oik_shape
    name = granularity.name
    if name == "weight":
        return out_dim * in_dim * kernel
    if name == "kernel":
        return out_dim * in_dim
    if name == "out_channel":
        return out_dim
    if name == "in_channel":
        return in_dim
    return granularity.unit_scores(torch.zeros(target.oik_shape), "sum").numel()


def _final_sparsity(sparsity: object, granularity: Granularity) -> float:
    if isinstance(granularity, NM):
        if sparsity is not None and abs(float(sparsity) - granularity.sparsity) > 1e-9:
            raise ValueError(
                f"{granularity.name} fixes the sparsity at {granularity.sparsity:g}; "
                f"leave sparsity out or set it to {granularity.sparsity:g}, got {sparsity}"
            )
        return granularity.sparsity
    if sparsity is None:
        raise TypeError("sparsity is required: the fraction of units to prune, e.g. sparsity=0.9")
    return check_sparsity(sparsity)


def prune(model: nn.Module, sparsity: float | None = None, **options: Any) -> Pruner:
    """Prune ``model`` once, now, and return the :class:`Pruner` holding its masks.

    Takes the same arguments as :class:`Pruner` (except ``schedule``). Keep the returned pruner to
    fine-tune with the masks enforced (call ``pruner.step()`` after each optimizer step, or attach the
    optimizer), or call ``pruner.remove()`` for a plain model.

    Example::

        pk.prune(model, sparsity=0.9, criterion="magnitude", granularity="weight", scope="global")
    """
    if "schedule" in options:
        raise TypeError("pk.prune prunes once, now; for a schedule use pk.Pruner(..., schedule=...)")
    # --- issue 11 (branch structured-oneshot): structured pruning from calibration data, with reconstruction
    structured = get_granularity(options.get("granularity", "weight")).name == "out_channel"
    if "reconstruct" in options or (structured and options.get("calibration") is not None):
        from .oneshot.structured import prune_structured_with_calibration

        return prune_structured_with_calibration(model, sparsity, **{"granularity": "weight", **options})
    # --- end issue 11 dispatch
    pruner = Pruner(model, sparsity, **options)
    try:
        pruner.prune()
    except BaseException:
        pruner._unhook()  # the failed prune changed no mask; only the new hooks must go
        raise
    return pruner
