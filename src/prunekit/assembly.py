"""Assembling a pruner: turn :class:`prunekit.Pruner`'s arguments into validated parts — the
granularity, criterion, schedule, targets, constraints, the engine that will compute masks (per layer,
or coupled dependency groups after a trace), the mask enforcer and the configuration — without
changing the model. Every refusal happens here, before the pruner hooks into anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import checks
from .core.config import PruningConfig, StructuredOptions, selector_name
from .core.sharding import has_sharded_parameters
from .core.targets import LayerSelector, Target, find_targets, resolve_layer_sparsity
from .core.validation import check_whole
from .engines.coupled import CoupledEngine
from .engines.enforcement import MaskEnforcer, unwrap_optimizer
from .engines.unstructured import SCOPES, UnstructuredEngine
from .engines.whole_attention import warn_whole_attention, whole_attention
from .fhe.budget import AccumulatorBudget
from .fhe.fan_in import FanInConstraint
from .methods.constraints import Constraint
from .methods.criteria import Criterion, get_criterion
from .methods.granularity import Granularity, final_sparsity, get_granularity, granularity_spec
from .methods.schedules import OneShot, Schedule, schedule_to_dict
from .structure.cost import UnitCosts
from .structure.dependencies import ChannelDependencies, trace_dependencies
from .summary import weight_applications


@dataclass
class Parts:
    """What a pruner is made of (see :func:`assemble`)."""

    granularity: Granularity
    criterion: Criterion
    scope: str
    schedule: Schedule
    sparsity: float
    min_kept: int
    targets: list[Target]
    constraints: list[Constraint]
    dependencies: ChannelDependencies | None
    engine: CoupledEngine | UnstructuredEngine
    enforcer: MaskEnforcer
    maskable: list[tuple[nn.Module, str, str]]
    config: PruningConfig
    optimizer: torch.optim.Optimizer | None


def assemble(
    model: nn.Module,
    sparsity: float | None,
    *,
    criterion: str | Criterion | Callable,
    granularity: str | Granularity,
    scope: str,
    schedule: Schedule | None,
    layer_sparsity: Mapping[str, float] | None,
    include: LayerSelector | Iterable[LayerSelector] | None,
    exclude: LayerSelector | Iterable[LayerSelector] | None,
    min_kept: int,
    example_inputs: Any,
    structured: StructuredOptions,
    data: Iterable | None,
    loss_fn: Callable | None,
    calibration: Iterable | None,
    seed: int | None,
    mask_gradients: bool,
    max_fan_in: int | AccumulatorBudget | None,
    constraints: Sequence[Constraint],
    optimizer: Any = None,
) -> Parts:
    """Validate the pruner's arguments and build its parts (the arguments are :class:`prunekit.Pruner`'s)."""
    checks.check_model(model, include)  # wrapped, reparametrized or quantized layers
    granularity = get_granularity(granularity)
    checks.check_options(
        granularity.name, structured.coupled, example_inputs, structured.prune_outputs,
        criterion if isinstance(criterion, str) else getattr(criterion, "name", ""), seed, mask_gradients,
    )  # fmt: skip
    constraints = _constraints(constraints, max_fan_in)
    fan_in_only = sparsity is None and max_fan_in is not None and granularity.fixed_sparsity is None
    sparsity_target = 0.0 if fan_in_only else final_sparsity(sparsity, granularity)
    criterion = get_criterion(criterion, data=data, loss_fn=loss_fn, seed=seed)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid scopes are {', '.join(map(repr, SCOPES))}")
    schedule = OneShot(at=0) if schedule is None else schedule
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be pk.OneShot, pk.Iterative or pk.Gradual, got {schedule!r}")
    if schedule.initial > sparsity_target:
        raise ValueError(
            f"the schedule starts at sparsity {schedule.initial} above the final sparsity {sparsity_target}"
        )
    min_kept = check_whole(min_kept, "min_kept", "units")
    targets = find_targets(model, include, exclude)
    checks.check_targets_have_values(targets)
    for target in targets:
        granularity.validate(target)
    for constraint in constraints:
        constraint.validate(targets, granularity)
    optimizer = None if optimizer is None else unwrap_optimizer(optimizer)
    _check_criterion_inputs(criterion, targets, calibration)
    coupled_mode = structured.coupled and granularity.whole_output_channels and example_inputs is not None
    if not coupled_mode and structured.changed():
        changed = ", ".join(f"{name}={getattr(structured, name)!r}" for name in structured.changed())
        raise ValueError(
            f"{changed} apply to coupled structured pruning only: use "
            "granularity='out_channel' with example_inputs (and coupled=True)"
        )
    if coupled_mode and has_sharded_parameters(model):
        raise ValueError(
            "coupled structured pruning (granularity='out_channel' with example_inputs) traces the model, "
            "which FSDP2's sharded parameters do not allow: prune (and compact) the model before sharding it "
            "with fully_shard, or pass coupled=False to prune each layer's output channels on their own"
        )
    dependencies = None
    if coupled_mode:
        with checks.record_calls(model) as ran:  # which layers ran: those no output reads are reported
            dependencies = trace_dependencies(
                model, example_inputs, exclude=exclude, prune_outputs=structured.prune_outputs
            )
        checks.check_has_units(dependencies, sparsity_target, structured.prune_outputs)
        checks.warn_unreached(checks.unreached_layers(dependencies, targets, ran, structured.prune_outputs))
        warn_whole_attention(whole_attention(model, dependencies, targets, min_kept))
        maskable = _dependency_tensors(dependencies)
        enforcer = MaskEnforcer(maskable, mask_gradients)
        left_out = set() if include is None else _left_out_weights(model, exclude, targets)

        def cost_model() -> UnitCosts:
            applied = weight_applications(model, example_inputs) if structured.sparsity_in == "macs" else None
            return UnitCosts(model, dependencies, applied)

        engine: CoupledEngine | UnstructuredEngine = CoupledEngine(
            dependencies, targets, criterion, scope, schedule, min_kept, structured, layer_sparsity or {}, left_out,
            {full: (m, p) for m, p, full in maskable}, cost_model,
        )  # fmt: skip
    else:
        overrides = resolve_layer_sparsity(targets, layer_sparsity)
        if granularity.selects_within_groups and any(v != 0.0 for v in overrides.values()):
            raise ValueError(
                f"with {granularity.name} a layer_sparsity override can only be 0.0 (leave that layer dense)"
            )
        maskable = _target_tensors(targets, granularity.prunes_bias)
        enforcer = MaskEnforcer(maskable, mask_gradients)

        def keep_of(target: Target) -> torch.Tensor | None:
            return enforcer.keep(target.module, target.param_name, target.full_name)

        engine = UnstructuredEngine(targets, granularity, criterion, scope, min_kept, overrides, schedule, keep_of)
    checks.warn_existing_masks(maskable)  # a second pruner on the same parameters
    config = PruningConfig(
        sparsity=sparsity_target,
        criterion=criterion.name,
        granularity=_granularity_description(granularity),
        scope=scope,
        schedule=schedule_to_dict(schedule),
        layer_sparsity=None if not layer_sparsity else {str(k): float(v) for k, v in layer_sparsity.items()},
        include=tuple(map(selector_name, _as_tuple(include))),
        exclude=tuple(map(selector_name, _as_tuple(exclude))),
        min_kept=min_kept,
        structured=structured,
        seed=seed,
        mask_gradients=bool(mask_gradients),
        max_fan_in=None if max_fan_in is None else max_fan_in if isinstance(max_fan_in, int) else repr(max_fan_in),
    )
    return Parts(
        granularity, criterion, scope, schedule, sparsity_target, min_kept, targets, constraints, dependencies,
        engine, enforcer, maskable, config, optimizer,
    )  # fmt: skip


def _granularity_description(granularity: Granularity) -> str | dict:
    try:
        return granularity_spec(granularity)
    except ValueError:  # not registered: its name still tells configurations apart
        return granularity.name


def _check_criterion_inputs(criterion: Criterion, targets: list[Target], calibration: Iterable | None) -> None:
    needs = criterion.statistics
    if needs and calibration is None and not criterion.has_statistics():
        raise ValueError(
            f"criterion {criterion.name!r} reads activation statistics ({', '.join(needs)}): pass "
            "calibration= (a list of batches the model accepts)"
        )
    if calibration is not None and not needs:
        raise ValueError(
            f"criterion {criterion.name!r} does not read calibration data: drop calibration= or use a "
            "data-aware criterion such as 'wanda'"
        )
    if criterion.needs_gradients and getattr(criterion, "data", None) is None:
        frozen = [t.full_name for t in targets if not t.param.requires_grad]
        if frozen:
            raise ValueError(
                f"criterion {criterion.name!r} scores weights by their gradients, but these weights have "
                f"requires_grad=False and would never get any: {frozen}; exclude them (exclude=[...]) or "
                "unfreeze them"
            )


def _constraints(constraints: Sequence[Constraint], max_fan_in: Any) -> list[Constraint]:
    found = list(constraints)
    for constraint in found:
        if not isinstance(constraint, Constraint):
            raise TypeError(f"constraints takes pk.Constraint objects, got {constraint!r}")
    return found + ([] if max_fan_in is None else [FanInConstraint(max_fan_in)])


def _as_tuple(selectors: Any) -> tuple:
    if selectors is None:
        return ()
    return (selectors,) if isinstance(selectors, (str, type)) else tuple(selectors)


def _target_tensors(targets: list[Target], prunes_bias: bool) -> list[tuple[nn.Module, str, str]]:
    """(module, parameter name, full name) of every target weight and, when units are whole outputs, its bias."""
    found = []
    for target in targets:
        found.append((target.module, target.param_name, target.full_name))
        if prunes_bias and target.bias is not None:
            found.append((target.module, target.bias_name, target.name_of(target.bias_name)))
    return found


def _dependency_tensors(dependencies: ChannelDependencies) -> list[tuple[nn.Module, str, str]]:
    """(module, parameter name, full name) of every parameter a dependency group cuts."""
    unique = {}
    for piece in dependencies.slices:
        if piece.maskable:
            unique.setdefault(piece.full_name, (piece.module, piece.tensor_name, piece.full_name))
    return list(unique.values())


def _left_out_weights(model: nn.Module, exclude: Any, targets: list[Target]) -> set[str]:
    """Full names of the prunable weights that ``include=`` leaves out (``exclude`` aside)."""
    targeted = {t.full_name for t in targets}
    return {t.full_name for t in find_targets(model, None, exclude)} - targeted
