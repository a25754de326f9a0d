"""Loading a saved state into a fresh model so that a failure changes nothing.

``torch.nn.Module.load_state_dict`` copies every tensor whose shape fits before it raises about the
ones that do not, and a compaction plan slices the model before any weight is loaded: a file from a
model with another classifier size used to leave a sliced, half-loaded model behind. Here the plan's
effect on every state-dict shape is worked out without touching the model, the saved keys and shapes
are compared with it, and only then is the plan applied and the state loaded; should anything still
fail, the modules' parameters, buffers and attributes are put back as they were.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..plans import PLAN_FORMAT, apply_plan, record_plan


def planned_shapes(model: nn.Module, plan: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shape of every state-dict entry of ``model`` once ``plan`` is applied (the model is not changed)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    by_tensor: dict[int, dict[int, int]] = {}  # id of a sliced tensor -> {dim: size}
    for full_name, dims in plan.get("kept", {}).items():
        module_name, _, tensor_name = full_name.rpartition(".")
        module = modules.get(module_name)
        if module is None or not isinstance(getattr(module, tensor_name, None), torch.Tensor):
            raise ValueError(
                f"the saved plan slices {full_name!r}, which this model does not have: the file was saved from "
                "another architecture; load it into an instance of the class (and configuration) it was saved from"
            )
        by_tensor[id(getattr(module, tensor_name))] = {int(d): len(indices) for d, indices in dims.items()}
    shapes = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        shape = list(tensor.shape)
        for dim, size in by_tensor.get(id(tensor), {}).items():
            if dim >= len(shape):
                raise ValueError(f"the saved plan slices dimension {dim} of {key!r}, which has shape {tuple(shape)}")
            shape[dim] = size
        shapes[key] = tuple(shape)
    return shapes


def check_architecture(expected: Mapping[str, tuple[int, ...]], saved: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ValueError naming the keys and shapes in which ``saved`` differs from ``expected``."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [
        f"{k}: saved {tuple(saved[k])}, model {tuple(expected[k])}"
        for k in expected
        if k in saved and tuple(saved[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing from the file: {_preview(missing)}")
    if unexpected:
        parts.append(f"not in the model: {_preview(unexpected)}")
    if shapes:
        parts.append(f"other shapes: {_preview(shapes)}")
    raise ValueError(
        "the file was saved from another architecture (" + "; ".join(parts) + "); load it into a fresh instance of "
        "the class it was saved from, built with the same configuration. The model was not changed"
    )


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, type, dict, dict]]:
    """Each module's class (compaction may turn an nn.MultiheadAttention into a PrunedMultiheadAttention),
    attributes, and the contents of its parameter, buffer and submodule dicts."""
    tables = ("_parameters", "_buffers", "_modules")
    return [(m, type(m), {t: dict(getattr(m, t)) for t in tables}, dict(vars(m))) for m in model.modules()]


def _restore(snapshot: list[tuple[nn.Module, type, dict, dict]]) -> None:
    for module, cls, tables, attributes in snapshot:
        module.__class__ = cls
        for table, contents in tables.items():
            getattr(module, table).clear()
            getattr(module, table).update(contents)
        for name in [n for n in vars(module) if n not in attributes]:
            delattr(module, name)
        for name, value in attributes.items():
            if name not in tables:
                module.__dict__[name] = value


def load_into(
    model: nn.Module, plan: Mapping[str, Any] | None, state: Mapping[str, torch.Tensor], state_metadata: Mapping | None
) -> nn.Module:
    """Apply ``plan`` to ``model`` and load ``state`` (strictly), or raise and leave ``model`` as it was.

    ``plan`` is a compaction plan (or None for none); ``state_metadata`` the state dict's ``_metadata``."""
    plan = dict(plan or {"format": PLAN_FORMAT, "kept": {}})
    plan.pop("state_metadata", None)
    if plan.get("format") != PLAN_FORMAT:
        raise ValueError(
            f"the file's plan is not a prunekit plan (format {plan.get('format')!r}, expected {PLAN_FORMAT!r})"
        )
    check_architecture(planned_shapes(model, plan), {k: tuple(v.shape) for k, v in state.items()})
    snapshot = _snapshot(model)
    try:
        apply_plan(model, plan)
        check_architecture(
            {k: tuple(v.shape) for k, v in model.state_dict().items()}, {k: tuple(v.shape) for k, v in state.items()}
        )
        ordered = OrderedDict(state)
        ordered._metadata = dict(state_metadata or {})
        model.load_state_dict(ordered, strict=True)
    except BaseException:
        _restore(snapshot)
        raise
    model.prunekit_plan = plan
    record_plan(model, plan)
    return model
