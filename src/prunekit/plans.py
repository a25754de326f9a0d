"""Plans: what compaction removes, as plain JSON — for every sliced tensor, the indices kept along
each dimension — and applying them.

:func:`make_plan` reads a plan off the traced units and the pruned ones, :func:`compose_plans` chains
two (compacting twice), :func:`apply_plan` slices a model in place and :func:`sliced_copy` makes a
compacted copy without copying the sliced tensors whole. After slicing, every module's size
attributes follow its tensors (the layer registry's ``update_shape``, or a module rule's
``update_shapes``), and attention modules written in the Hugging Face / timm style recount their heads.
Integrations that keep plans elsewhere (a Hugging Face config) register hooks with
:func:`register_plan_hooks`; this module never imports them.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .core import masks as mask_store
from .core.layers import handler_for
from .structure.dependencies import ChannelDependencies, Slice
from .structure.heads import (  # noqa: F401  (attention_head_counts, projection_width: used by hf)
    HEAD_COUNT_ATTRIBUTES,
    HEADS_WIDTH_ATTRIBUTES,
    KV_HEAD_COUNT_ATTRIBUTES,
    attention_head_counts,
    projection_width,
)
from .structure.registry import module_rule

PLAN_FORMAT = "prunekit-plan/1"


#: ``fn(model) -> plan or None``: where a model may carry an earlier plan besides ``model.prunekit_plan``
#: (a Hugging Face config, :mod:`prunekit.hf`).
_PLAN_READERS: list[Callable[[nn.Module], Mapping[str, Any] | None]] = []
#: ``fn(model, plan)``: called once a model is compacted or loaded with a plan (to update a config).
_PLAN_WRITERS: list[Callable[[nn.Module, Mapping[str, Any]], None]] = []


def register_plan_hooks(
    read: Callable[[nn.Module], Mapping[str, Any] | None] | None = None,
    write: Callable[[nn.Module, Mapping[str, Any]], None] | None = None,
) -> None:
    """Let an integration read earlier plans from where it keeps them (``read(model)``) and record a
    compacted or loaded model's plan there (``write(model, plan)``), e.g. in a Hugging Face config."""
    if read is not None:
        _PLAN_READERS.append(read)
    if write is not None:
        _PLAN_WRITERS.append(write)


def earlier_plan(model: nn.Module) -> Mapping[str, Any] | None:
    plan = getattr(model, "prunekit_plan", None)
    for read in _PLAN_READERS:
        plan = plan or read(model)
    return plan


def record_plan(model: nn.Module, plan: Mapping[str, Any]) -> None:
    """Tell the integrations (:func:`register_plan_hooks`) that ``model`` now carries ``plan``."""
    for write in _PLAN_WRITERS:
        write(model, plan)


def make_plan(dependencies: ChannelDependencies, pruned_units: torch.Tensor) -> dict[str, Any]:
    """The plan of removing ``pruned_units`` (bool per unit): ``{"kept": {tensor name: {dim: kept
    indices}}}`` for every tensor dimension that loses an index."""
    kept: dict[str, dict[str, list[int]]] = {}
    slices = dependencies.slices
    if not slices:
        return {"format": PLAN_FORMAT, "kept": kept}
    # All slices at once (their unit vectors end to end): one selection instead of one per slice.
    units = torch.cat([piece.unit for piece in slices])
    sizes = torch.tensor([piece.unit.numel() for piece in slices])
    removed = Slice.removed_of(pruned_units, units)
    owner = torch.repeat_interleave(torch.arange(len(slices)), sizes)
    kept_counts = torch.zeros(len(slices), dtype=torch.int64).index_add_(0, owner, (~removed).long())
    # every slice's kept positions, counted from its own start, as one list cut per slice
    positions = torch.nonzero(~removed).reshape(-1) - torch.repeat_interleave(
        torch.cumsum(sizes, 0) - sizes, kept_counts
    )
    positions = positions.tolist()
    ends = torch.cumsum(kept_counts, 0).tolist()
    for piece, end, count, size in zip(slices, ends, kept_counts.tolist(), sizes.tolist()):
        if count < size:
            kept.setdefault(piece.full_name, {})[str(piece.dim)] = positions[end - count : end]
    return {"format": PLAN_FORMAT, "kept": kept}


def compose_plans(earlier: Mapping[str, Any] | None, later: Mapping[str, Any]) -> dict[str, Any]:
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
    work = _plan_work(model, plan)
    owners = _tensor_owners(model)
    changed = []
    with torch.no_grad():
        for module, tensor_name, dims in work:
            tensor = getattr(module, tensor_name)
            new = _sliced(tensor, dims)
            if isinstance(tensor, nn.Parameter):
                new = nn.Parameter(new, requires_grad=tensor.requires_grad)
            # A tensor shared by several modules (tied weights) is sliced once, for all its owners.
            for owner, owner_name in owners.get(id(tensor), [(module, tensor_name)]):
                (owner._parameters if owner_name in owner._parameters else owner._buffers)[owner_name] = new
                changed.append(owner)
    _update_shapes(model, changed)
    return model


def _plan_work(model: nn.Module, plan: Mapping[str, Any]) -> list[tuple[nn.Module, str, dict]]:
    """``[(module, tensor name, {dim: kept indices})]`` of a plan, validated against the model."""
    if not isinstance(plan, Mapping) or plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"not a prunekit plan (expected format {PLAN_FORMAT!r})")
    modules = dict(model.named_modules(remove_duplicate=False))
    work, planned = [], {}
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
        # A tensor shared by several modules (tied weights) is sliced once, for all its owners.
        earlier = planned.get(id(tensor))
        if earlier is not None:
            if earlier[1] != {int(d): list(i) for d, i in dims.items()}:
                raise ValueError(
                    f"the plan slices the shared tensor {earlier[0]!r} and {full_name!r} (one tensor) differently; "
                    "a tied tensor must keep the same indices in all its owners"
                )
            continue
        planned[id(tensor)] = (full_name, {int(d): list(i) for d, i in dims.items()})
        work.append((module, tensor_name, dims))
    return work


def _sliced(tensor: torch.Tensor, dims: Mapping[str, list[int]]) -> torch.Tensor:
    """A new dense tensor of the indices a plan keeps along each dimension, in ``tensor``'s memory format."""
    new = tensor.detach()
    # Rows first: selecting whole rows copies contiguous runs and leaves less to gather across columns.
    for dim, indices in sorted(dims.items(), key=lambda item: int(item[0])):
        if new.device.type == "meta":
            new = _meta_select(new, int(dim), len(indices))
        else:
            # through numpy: torch.tensor reads a list of ints several times slower
            kept = torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(new.device)
            new = new.index_select(int(dim), kept)
    return _dense_like(new, tensor)


def _update_shapes(model: nn.Module, changed: list[nn.Module]) -> None:
    """Size attributes of the sliced modules, and head counts of the attention modules above them."""
    for module in dict.fromkeys(changed):
        update_shape_attributes(module)
    changed_ids = {id(m) for m in changed}
    for module in model.modules():
        if any(id(child) in changed_ids for child in module.children()):
            update_attention_attributes(module)


@torch.no_grad()
def sliced_copy(
    model: nn.Module, plan: Mapping[str, Any], mask_of: Callable[[nn.Module, str], torch.Tensor | None] | None = None
) -> nn.Module:
    """A deep copy of ``model`` with the plan applied and no masks, in which every tensor the plan slices
    is copied already sliced (its pruned entries zeroed): no full-size copy of those tensors is made."""
    work = _plan_work(model, plan)
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    memo: dict[int, Any] = {}
    for module, tensor_name, dims in work:
        tensor = getattr(module, tensor_name)
        if id(tensor) in memo:  # shared by two modules: one copy, as deepcopy would make
            continue
        new = _sliced(tensor, dims)
        packed = module._buffers.get(mask_store.mask_buffer_name(tensor_name))
        # Masked entries that survive the slicing (unstructured masks beside the units) are zeroed. When
        # the mask prunes exactly as many entries as the slicing removes, none survives: no unpacking.
        if packed is not None and tensor.numel() - mask_store.count_kept(packed) != tensor.numel() - new.numel():
            read = mask_store.get_mask if mask_of is None else mask_of
            new.mul_(_sliced(read(module, tensor_name).view(torch.uint8), dims))  # uint8: no type promotion
        memo[id(tensor)] = (
            nn.Parameter(new, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new
        )
        if packed is not None:
            memo[id(packed)] = packed  # not copied: the copy's mask of a sliced tensor is dropped below
    small = copy_module_tree(model, memo)
    copies = dict(small.named_modules(remove_duplicate=False))
    sliced = {(names[id(module)], tensor_name) for module, tensor_name, _ in work}
    for name, tensor_name in sliced:
        mask_store.remove_mask(copies[name], tensor_name)
    for module in small.modules():  # masks of tensors the plan leaves whole: zero their pruned entries
        for param_name in list(module._parameters):
            keep = mask_store.get_mask(module, param_name)
            if keep is not None:
                mask_store.zero_pruned(module._parameters[param_name], keep)
                mask_store.remove_mask(module, param_name)
    _update_shapes(small, [copies[name] for name, _ in sliced])
    return small


def _copied_tensor(tensor: torch.Tensor | None, memo: dict[int, Any]) -> torch.Tensor | None:
    if tensor is None:
        return None
    found = memo.get(id(tensor))
    if found is not None:
        return found
    if _is_plain_whole_tensor(tensor):  # a buffer such as num_batches_tracked: a clone is its deep copy
        memo[id(tensor)] = found = tensor.detach().clone()
        return found
    return copy.deepcopy(tensor, memo)


def _is_plain_whole_tensor(tensor: torch.Tensor) -> bool:
    """A plain dense CPU/GPU tensor, not a view, holding its whole storage, with no grad and no Python
    attributes: ``clone()`` copies everything ``deepcopy`` would."""
    return (
        type(tensor) is torch.Tensor
        and tensor.layout == torch.strided
        and tensor.device.type in ("cpu", "cuda")
        and not tensor.requires_grad
        and tensor._base is None
        and not tensor.__dict__
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        and tensor.is_contiguous()
    )


# A class with one of these copies in its own way: deepcopy it. A class's own ``__setstate__`` (such
# as ``_ConvNd``'s, which fills in ``padding_mode`` for old pickles) is called, as deepcopy calls it.
_COPY_HOOKS = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__copy__")
_ATOMIC = (int, float, bool, str, bytes, type(None), torch.dtype)
_EMPTY_COPIES = (dict, OrderedDict, set, list)


def copy_module_tree(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(module, memo)``, faster for trees of plain modules: a module whose class copies
    as ``nn.Module`` does (no copy hooks of its own other than ``__setstate__``, which is called as
    deepcopy calls it) gets a new instance whose state holds its submodules copied the same way, its
    tensors from ``memo`` (or cloned, or deep-copied), immutable values as they are and everything else
    deep-copied with the same memo; any other object goes to ``copy.deepcopy``. Shared submodules and
    tensors stay shared, as with ``deepcopy``."""
    found = memo.get(id(module))
    if found is not None:
        return found
    cls = type(module)
    if any(getattr(cls, name, None) is not getattr(nn.Module, name, None) for name in _COPY_HOOKS) or any(
        "__slots__" in vars(base) for base in cls.__mro__
    ):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        if key == "_modules":
            state[key] = type(value)(
                (name, None if child is None else copy_module_tree(child, memo)) for name, child in value.items()
            )
        elif key in ("_parameters", "_buffers"):
            state[key] = type(value)((name, _copied_tensor(tensor, memo)) for name, tensor in value.items())
        elif isinstance(value, _ATOMIC) or (type(value) is tuple and all(isinstance(v, _ATOMIC) for v in value)):
            state[key] = value
        elif type(value) in _EMPTY_COPIES and not value:  # the hook dictionaries, mostly
            state[key] = type(value)()
        elif type(value) is set and all(type(v) is str for v in value):  # _non_persistent_buffers_set
            state[key] = set(value)
        else:
            state[key] = copy.deepcopy(value, memo)
    if cls.__setstate__ is nn.Module.__setstate__:
        new.__dict__.update(state)
    else:
        new.__setstate__(state)
    return new


def _dense_like(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` made dense in ``old``'s memory format (a channels_last conv weight stays channels_last)."""
    if old.ndim == 4 and not old.is_contiguous() and old.is_contiguous(memory_format=torch.channels_last):
        return new.contiguous(memory_format=torch.channels_last)
    if old.ndim == 5 and not old.is_contiguous() and old.is_contiguous(memory_format=torch.channels_last_3d):
        return new.contiguous(memory_format=torch.channels_last_3d)
    return new.contiguous()


def _tensor_owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``{id(tensor): [(module, name), ...]}`` for every parameter and buffer, all owners of tied ones."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in dict.fromkeys(model.modules()):
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None:
                    owners.setdefault(id(tensor), []).append((module, name))
    return owners


def _meta_select(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[dim] = size
    return torch.empty(shape, dtype=tensor.dtype, device="meta")


def update_shape_attributes(module: nn.Module) -> None:
    """Make a module's size attributes agree with its (sliced) tensors: as its layer handler says
    (:mod:`prunekit.core.layers`), or, for a type traced by a module rule, by the ``update_shapes`` it
    was registered with (:func:`prunekit.structure.register_module_rule`)."""
    handler = handler_for(module)
    if handler is not None:
        handler.update_shape(module)
    registered = module_rule(module)
    if registered is not None and registered.update_shapes is not None:
        registered.update_shapes(module)


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
