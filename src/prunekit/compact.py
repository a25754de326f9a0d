"""Compaction: physically remove pruned channels, so the model is a smaller dense model.

:func:`compact` traces the model's channel dependencies (:mod:`prunekit.structure`), finds the units
whose every parameter slice is pruned (masked, or exactly zero when the model carries no prunekit
masks), slices them out of every parameter and buffer they touch, updates the attributes that describe
shapes (``in_features``, ``out_channels``, ``groups``, ``num_features``, ...) and checks that the
result computes what the masked model computed.

What was removed is a *plan*: for every sliced tensor, the indices kept along each dimension. A plan
is plain JSON; :func:`save_pruned` writes it with the weights, and :func:`load_pruned` applies it to a
fresh instance of the original model class before loading the weights, so no pickled module is ever
needed.
"""

from __future__ import annotations

import copy
import traceback
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import checks
from .core import masks as mask_store
from .core.inputs import call_model
from .core.targets import LayerSelector
from .plans import apply_plan, compose_plans, earlier_plan, make_plan, record_plan, sliced_copy
from .structure.dependencies import trace_with_output
from .structure.trace import tensor_leaves
from .structure.units import removed_units


class CompactionError(RuntimeError):
    """The compacted model does not compute what the masked model computes."""


def compact(
    model: nn.Module,
    example_inputs: Any,
    *,
    exclude: LayerSelector | Iterable[LayerSelector] | None = None,
    prune_outputs: bool = False,
    inplace: bool = False,
    check: bool = True,
    tolerance: float = 1e-4,
) -> nn.Module:
    """Return ``model`` with its pruned channels, neurons and heads physically removed.

    Args:
        model: a model pruned with ``granularity="out_channel"`` and ``example_inputs`` (so whole
            coupled groups are masked), or any model whose removable channels are exactly zero.
        example_inputs: a tensor, tuple or dict the model accepts; used to trace dependencies and to
            check the result.
        exclude / prune_outputs: as given to the pruner (see :func:`prunekit.structure.trace_dependencies`).
            When neither is given, the ones the pruner traced the (unchanged) model with are used, so
            ``pk.prune(model, ..., exclude=["lstm"], example_inputs=x)`` then ``pk.compact(model, x)``
            leaves the LSTM whole without naming it twice.
        inplace: change ``model`` itself instead of a deep copy (saves memory on large models).
        check: run both models on ``example_inputs`` and raise :class:`CompactionError` if any output
            differs by more than ``tolerance`` × the largest absolute output value.

    The returned model carries no prunekit masks (its pruned weights are gone); its ``prunekit_plan``
    attribute holds the plan, which :func:`save_pruned` stores. A Hugging Face ``PreTrainedModel``'s
    ``config`` is updated to describe the compacted model where every layer has the same size, and holds
    the plan and the original sizes in a ``prunekit`` entry (see :mod:`prunekit.hf`), so
    ``save_pretrained`` / ``from_pretrained`` or :func:`prunekit.from_pretrained` round-trip it.
    """
    checks.check_unwrapped(model)
    checks.check_flags(prune_outputs=prune_outputs, inplace=inplace, check=check)
    tolerance = checks.check_tolerance(tolerance)
    dependencies, traced = trace_with_output(model, example_inputs, exclude, prune_outputs, inherit_options=True)
    pruned_units = removed_units(dependencies)
    plan = make_plan(dependencies, pruned_units)
    if not plan["kept"]:
        _warn_nothing_removed(model)
    _refuse_emptied(plan)
    # A Hugging Face model loaded with plain from_pretrained has its earlier plan only in its config
    # (read, and checked to be prunekit's, before anything changes).
    earlier = earlier_plan(model)
    reference = None
    if check:
        # A trace made just now that ran the model for real (eval mode, no gradients): its output is the
        # reference, with no second run. A cached trace is older than the masks, and a trace of shapes
        # computed nothing, so then the model runs.
        reference = _run(model, example_inputs) if traced is None else _float_leaves(traced)
    if inplace:
        small = model
        with torch.no_grad():
            for module in small.modules():
                for param_name in list(module._parameters):
                    keep = mask_store.get_mask(module, param_name)
                    if keep is not None:
                        mask_store.zero_pruned(module._parameters[param_name], keep)
                        mask_store.remove_mask(module, param_name)
        apply_plan(small, plan)
    else:
        small = sliced_copy(model, plan)
    small.prunekit_plan = compose_plans(earlier, plan)
    record_plan(small, small.prunekit_plan)
    if check:
        try:
            result = _run(small, example_inputs)
        except Exception as error:
            module_name, line = failure_site(small, error)
            raise CompactionError(
                f"the compacted model fails on the example inputs in module {module_name!r}, at `{line}` "
                f"({type(error).__name__}: {error}). Its forward probably uses a channel or head count or an "
                "index written as a constant (e.g. x[:, :64], x.view(n, 512) or self.num_heads); exclude that "
                f"module (exclude=[{module_name!r}]) so its channels stay"
            ) from error
        try:
            _check(reference, result, tolerance)
        except CompactionError:
            if inplace:
                raise
            # float32 sums over fewer channels round differently; only a difference that survives in
            # float64 is a real one (deep, randomly initialised nets can have outputs ~1e-6 in scale).
            _check(_run_double(model, example_inputs), _run_double(small, example_inputs), tolerance)
    return small


def _refuse_emptied(plan: Mapping[str, Any]) -> None:
    """Refuse, before anything changes, a plan that removes every index of a dimension: PyTorch layers
    cannot have zero channels (this happens when the pruner ran with ``min_kept=0``)."""
    for full_name, dims in plan["kept"].items():
        for dim, indices in dims.items():
            if not indices:
                module_name = full_name.rpartition(".")[0] or "<root>"
                raise CompactionError(
                    f"compaction would remove every index of dimension {dim} of {full_name!r}, leaving module "
                    f"{module_name!r} with no channels, which PyTorch layers cannot have (was it pruned with "
                    "min_kept=0?); prune again with min_kept ≥ 1, or exclude that module (exclude=[...])"
                )


def _warn_nothing_removed(model: nn.Module) -> None:
    masked = any(name.startswith(mask_store.MASK_PREFIX) for m in model.modules() for name in m._buffers)
    why = (
        "its prunekit masks remove single weights (or filters of one layer without the channels coupled to "
        "them), and compaction removes only whole coupled channels, neurons and heads"
        if masked
        else "no channel, neuron or head of it is entirely zero"
    )
    warnings.warn(
        f"pk.compact removed nothing: {why}. For a smaller model prune with granularity='out_channel' and "
        "example_inputs=... (coupled structured pruning); unstructured sparsity needs a sparse format or kernel instead",
        UserWarning,
        stacklevel=3,
    )


def failure_site(model: nn.Module, error: BaseException) -> tuple[str, str]:
    """(name of the innermost module of ``model`` whose forward raised ``error``, the source line there
    that raised it); ``"<the model's own forward>"`` and the last line for errors outside any submodule."""
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    found, line = None, "?"
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)]
    frames = traceback.extract_tb(error.__traceback__)
    # The last line of the model's own code: frames below it are torch's.
    for summary in reversed(frames):
        if "/torch/" not in summary.filename.replace("\\", "/"):
            line = (summary.line or "?").strip()
            break
    return (found or "<the model's own forward>"), line


def _run_double(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    def widen(value):
        return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    return _run(copy.deepcopy(model).double(), pytree.tree_map(widen, example_inputs))


def _float_leaves(output: Any) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensor_leaves(output) if t.is_floating_point()]


def _run(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return _float_leaves(call_model(model, example_inputs))
    finally:
        for module, training in flags.items():
            module.training = training


def _kept_outputs(reference: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """With ``prune_outputs`` an output loses the positions that were pruned (zeros in the masked model):
    the reference without them."""
    if reference.ndim != result.ndim:
        return reference
    differing = [d for d in range(reference.ndim) if reference.shape[d] != result.shape[d]]
    if len(differing) != 1:
        return reference
    dim = differing[0]
    alive = reference.movedim(dim, 0).reshape(reference.shape[dim], -1).ne(0).any(dim=1)
    return reference.index_select(dim, torch.nonzero(alive).reshape(-1))


def _check(reference: list[torch.Tensor], result: list[torch.Tensor], tolerance: float) -> None:
    reference = [_kept_outputs(a, b) for a, b in zip(reference, result)]
    if len(reference) != len(result) or any(a.shape != b.shape for a, b in zip(reference, result)):
        raise CompactionError(
            "the compacted model's outputs have other shapes than the masked model's "
            f"({[tuple(t.shape) for t in reference]} vs {[tuple(t.shape) for t in result]}); please report this model"
        )
    for index, (a, b) in enumerate(zip(reference, result)):
        if a.device.type == "meta":
            continue
        for which, values in (("masked", a), ("compacted", b)):
            if values.numel() and not bool(torch.isfinite(values).all()):
                raise CompactionError(
                    f"output {index} of the {which} model has NaN or inf values, so compaction cannot be checked; "
                    "fix the non-finite parameters or inputs (pk.prune refuses them), or pass check=False"
                )
        scale = float(a.abs().max()) if a.numel() else 0.0
        error = float((a - b).abs().max()) if a.numel() else 0.0
        if not error <= tolerance * max(scale, 1e-12):  # NaN-aware: a NaN error fails
            raise CompactionError(
                f"output {index} of the compacted model differs from the masked model's by {error:.3g} "
                f"(output scale {scale:.3g}, tolerance {tolerance:g} of it); please report this model. "
                "Excluding the module that causes it (exclude=[...]) leaves it whole"
            )


# ---------------------------------------------------------------------------- saving and loading
