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
import json
import math
import os
import traceback
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import hf
from . import masks as mask_store
from .attention import shrink_multihead_attention
from .structure.dependencies import ChannelDependencies, call_model, trace_with_output
from .structure.heads import (  # noqa: F401  (attention_head_counts, projection_width: used by hf)
    HEAD_COUNT_ATTRIBUTES,
    HEADS_WIDTH_ATTRIBUTES,
    KV_HEAD_COUNT_ATTRIBUTES,
    attention_head_counts,
    projection_width,
)
from .structure.registry import module_rule
from .structure.trace import tensor_leaves
from .targets import LayerSelector, is_hf_conv1d

PLAN_FORMAT = "prunekit-plan/1"


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
        inplace: change ``model`` itself instead of a deep copy (saves memory on large models).
        check: run both models on ``example_inputs`` and raise :class:`CompactionError` if any output
            differs by more than ``tolerance`` × the largest absolute output value.

    The returned model carries no prunekit masks (its pruned weights are gone); its ``prunekit_plan``
    attribute holds the plan, which :func:`save_pruned` stores. A Hugging Face ``PreTrainedModel``'s
    ``config`` is updated to describe the compacted model where every layer has the same size, and holds
    the plan and the original sizes in a ``prunekit`` entry (see :mod:`prunekit.hf`), so
    ``save_pretrained`` / ``from_pretrained`` or :func:`prunekit.from_pretrained` round-trip it.
    """
    dependencies, traced = trace_with_output(model, example_inputs, exclude, prune_outputs)
    pruned_units = removed_units(dependencies)
    plan = _plan(dependencies, pruned_units)
    # A Hugging Face model loaded with plain from_pretrained has its earlier plan only in its config
    # (read, and checked to be prunekit's, before anything changes).
    earlier_plan = getattr(model, "prunekit_plan", None) or hf.saved_plan(model)
    reference = None
    if check:
        # A trace made just now ran the model as it is (eval mode, no gradients): its output is the
        # reference, with no second run. A cached trace is older than the masks, so the model runs again.
        reference = _run(model, example_inputs) if traced is None else _float_leaves(traced)
    small = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for module in small.modules():
            for param_name in list(module._parameters):
                keep = mask_store.get_mask(module, param_name)
                if keep is not None:
                    mask_store.zero_pruned(module._parameters[param_name], keep)
                    mask_store.remove_mask(module, param_name)
    apply_plan(small, plan)
    small.prunekit_plan = _compose(earlier_plan, plan)
    hf.record_in_config(small, small.prunekit_plan)
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


def removed_units(dependencies: ChannelDependencies) -> torch.Tensor:
    """Bool per unit: True when the unit's channels are zero: every parameter slice that makes them
    (filters, biases, norm weights) is pruned, i.e. masked, or all zeros where the parameter has no mask.
    Input columns that read the channels and buffers (running statistics) do not count: they go with it."""
    # One spare slot at the end takes the indices in no unit (a where instead of boolean-mask indexing).
    spare = dependencies.num_units
    gone = torch.ones(spare + 1, dtype=torch.bool)
    seen = torch.zeros(spare + 1, dtype=torch.bool)
    for piece in dependencies.slices:
        if piece.tensor_name not in piece.module._parameters or piece.consumer:
            continue
        keep = mask_store.get_mask(piece.module, piece.tensor_name)
        values = piece.tensor.detach()
        size = values.shape[piece.dim]
        if values.device.type == "meta":
            alive = torch.ones(size, dtype=torch.bool)
        elif keep is not None:
            alive = keep.cpu().movedim(piece.dim, 0).reshape(size, -1).any(dim=1)
        else:
            # The largest |value| of each index, compared with 0: several times faster than any() over a
            # bool copy (NaN stays alive, as with != 0).
            lead = math.prod(values.shape[: piece.dim])
            alive = values.reshape(lead, size, -1).abs().amax(dim=(0, 2)).cpu() != 0
        units = torch.where(piece.unit >= 0, piece.unit, spare)
        gone.scatter_reduce_(0, units, ~alive, reduce="amin")
        seen.index_fill_(0, units, True)
    return (gone & seen)[:spare]


def _plan(dependencies: ChannelDependencies, pruned_units: torch.Tensor) -> dict[str, Any]:
    kept: dict[str, dict[str, list[int]]] = {}
    for piece in dependencies.slices:
        removed = piece.removed(pruned_units)
        if bool(removed.any()):
            indices = torch.nonzero(~removed).reshape(-1).tolist()
            kept.setdefault(piece.full_name, {})[str(piece.dim)] = indices
    return {"format": PLAN_FORMAT, "kept": kept}


def _compose(earlier: Mapping[str, Any] | None, later: Mapping[str, Any]) -> dict[str, Any]:
    """One plan equivalent to applying ``earlier`` and then ``later`` (indices of ``later`` refer to
    the already-compacted tensors)."""
    kept = {name: {dim: list(indices) for dim, indices in dims.items()} for name, dims in later["kept"].items()}
    if not earlier:
        return {"format": PLAN_FORMAT, "kept": kept}
    combined = {name: {dim: list(indices) for dim, indices in dims.items()} for name, dims in earlier["kept"].items()}
    for name, dims in kept.items():
        for dim, indices in dims.items():
            before = combined.setdefault(name, {}).get(dim)
            combined[name][dim] = indices if before is None else [before[i] for i in indices]
    kept = combined
    return {"format": PLAN_FORMAT, "kept": kept}


def apply_plan(model: nn.Module, plan: Mapping[str, Any]) -> nn.Module:
    """Slice ``model``'s tensors as ``plan`` says and update shape attributes, in place; returns the model.

    Validates the whole plan against the model before changing anything."""
    if not isinstance(plan, Mapping) or plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"not a prunekit plan (expected format {PLAN_FORMAT!r})")
    modules = dict(model.named_modules(remove_duplicate=False))
    work = []
    for full_name, dims in plan["kept"].items():
        module_name, _, tensor_name = full_name.rpartition(".")
        module = modules.get(module_name)
        tensor = None if module is None else getattr(module, tensor_name, None)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"the plan slices {full_name!r}, which this model does not have; "
                "apply it to an instance of the model class it was made from"
            )
        for dim, indices in dims.items():
            dim = int(dim)
            if dim >= tensor.ndim or (indices and max(indices) >= tensor.shape[dim]):
                raise ValueError(
                    f"the plan keeps indices up to {max(indices)} of {full_name!r} dimension {dim}, "
                    f"but it has shape {tuple(tensor.shape)}; was the model built with the same configuration?"
                )
        work.append((module, tensor_name, dims))
    changed = []
    with torch.no_grad():
        for module, tensor_name, dims in work:
            tensor = getattr(module, tensor_name)
            new = tensor.detach()
            for dim, indices in dims.items():
                index = torch.tensor(indices, dtype=torch.long, device=new.device)
                new = (
                    new.index_select(int(dim), index)
                    if new.device.type != "meta"
                    else _meta_select(new, int(dim), len(indices))
                )
            if tensor_name in module._parameters:
                module._parameters[tensor_name] = nn.Parameter(new.contiguous(), requires_grad=tensor.requires_grad)
            else:
                module._buffers[tensor_name] = new.contiguous()
            changed.append(module)
    for module in dict.fromkeys(changed):
        update_shape_attributes(module)
    changed_ids = {id(m) for m in changed}
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            shrink_multihead_attention(module)
        elif any(id(child) in changed_ids for child in module.children()):
            update_attention_attributes(module)
    return model


def _meta_select(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[dim] = size
    return torch.empty(shape, dtype=tensor.dtype, device="meta")


def update_shape_attributes(module: nn.Module) -> None:
    """Make a module's size attributes agree with its (sliced) parameters (for a type with a module rule,
    by the ``update_shapes`` it was registered with, see :func:`prunekit.structure.register_module_rule`)."""
    weight = getattr(module, "weight", None)
    registered = module_rule(module)
    if registered is not None:
        if registered.update_shapes is not None:
            registered.update_shapes(module)
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.conv._ConvTransposeNd):
        module.in_channels = weight.shape[0]
        module.out_channels = weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.conv._ConvNd):
        # Grouped convs lose whole groups, so filters per group stay as they were.
        if module.groups > 1:
            module.groups = weight.shape[0] // (module.out_channels // module.groups)
        module.out_channels = weight.shape[0]
        module.in_channels = weight.shape[1] * module.groups
    elif isinstance(module, (nn.modules.batchnorm._NormBase)):
        reference = weight if weight is not None else module.running_mean
        if reference is not None:
            module.num_features = reference.shape[0]
    elif isinstance(module, nn.GroupNorm):
        module.num_groups = weight.shape[0] // (module.num_channels // module.num_groups)
        module.num_channels = weight.shape[0]
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = weight.shape[1]
    elif is_hf_conv1d(module):
        module.nf = weight.shape[1]  # Hugging Face's GPT-2 Conv1D: weight stored (in, out)


def update_attention_attributes(module: nn.Module) -> None:
    """Attention modules written in the Hugging Face / timm style keep their head counts in attributes
    next to a fixed head size: recount them from the query and key projections after heads were removed.

    Updated where the module has them: the query head count (``num_heads``, ``num_attention_heads``,
    ``n_head``, ``n_heads``: BERT, ViT, GPT-2, T5, timm), the key/value head count
    (``num_key_value_heads``), the width of all heads together (``all_head_size``: BERT; ``inner_dim``:
    T5), the query heads per key/value head (``num_key_value_groups``: LLaMA, whose grouped-query
    attention repeats each key/value head that often), and GPT-2's ``split_size`` (the width at which
    its fused ``c_attn`` output is split into q, k and v)."""
    counts = attention_head_counts(module)
    if counts is None:
        return
    heads, kv_heads, head_dim = counts
    width = heads * head_dim
    for name in HEAD_COUNT_ATTRIBUTES:
        if isinstance(getattr(module, name, None), int) and not isinstance(getattr(module, name), bool):
            setattr(module, name, heads)
    for name in HEADS_WIDTH_ATTRIBUTES:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, width)
    if isinstance(getattr(module, "split_size", None), int):
        module.split_size = width
    if kv_heads:
        for name in KV_HEAD_COUNT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, kv_heads)
        if isinstance(getattr(module, "num_key_value_groups", None), int) and heads % kv_heads == 0:
            module.num_key_value_groups = heads // kv_heads


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
        scale = float(a.abs().max()) if a.numel() else 0.0
        error = float((a - b).abs().max()) if a.numel() else 0.0
        if error > tolerance * max(scale, 1e-12):
            raise CompactionError(
                f"output {index} of the compacted model differs from the masked model's by {error:.3g} "
                f"(output scale {scale:.3g}, tolerance {tolerance:g} of it); please report this model. "
                "Excluding the module that causes it (exclude=[...]) leaves it whole"
            )


# ---------------------------------------------------------------------------- saving and loading


def save_pruned(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a compacted model as its plan (JSON) and its weights, without pickling the module.

    A path ending in ``.safetensors`` is written with safetensors (``pip install safetensors``), the
    plan in its metadata; any other path with ``torch.save`` of plain tensors and strings, which
    :func:`load_pruned` reads with ``weights_only=True``.
    """
    plan = getattr(model, "prunekit_plan", None) or {"format": PLAN_FORMAT, "kept": {}}
    full_state = model.state_dict()
    state = {k: v.detach().contiguous() for k, v in full_state.items()}
    # Some modules check the version their state was saved with (torchvision's MNASNet): keep it.
    plan = {**plan, "state_metadata": getattr(full_state, "_metadata", None) or {}}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(_unshare(state), str(path), metadata={"prunekit_plan": json.dumps(plan)})
    else:
        torch.save({"prunekit_plan": json.dumps(plan), "state_dict": state}, path)


def load_pruned(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved with :func:`save_pruned`: ``model`` is a fresh instance of the original,
    unpruned class (built with the same configuration); its tensors are sliced as the plan says, its
    shape attributes updated, and the saved weights loaded (strictly). Returns ``model``."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            plan = json.loads(handle.metadata()["prunekit_plan"])
        state = load_file(str(path))
    else:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        plan, state = json.loads(saved["prunekit_plan"]), saved["state_dict"]
    apply_plan(model, plan)
    state = OrderedDict(state)
    state._metadata = plan.pop("state_metadata", {})
    model.load_state_dict(state, strict=True)
    model.prunekit_plan = plan
    hf.record_in_config(model, plan)
    return model


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give each its own copy."""
    seen: set[int] = set()
    result = {}
    for key, value in state.items():
        pointer = value.data_ptr()
        result[key] = value.clone() if pointer in seen and value.numel() else value
        seen.add(pointer)
    return result
