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
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .core import masks as mask_store
from .core.inputs import call_model
from .core.layers import handler_for, is_hf_conv1d
from .core.targets import LayerSelector
from .structure.dependencies import ChannelDependencies, trace_with_output
from .structure.registry import module_rule
from .structure.trace import tensor_leaves
from .structure.units import removed_units

PLAN_FORMAT = "prunekit-plan/1"


class CompactionError(RuntimeError):
    """The compacted model does not compute what the masked model computes."""


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


def _earlier_plan(model: nn.Module) -> Mapping[str, Any] | None:
    plan = getattr(model, "prunekit_plan", None)
    for read in _PLAN_READERS:
        plan = plan or read(model)
    return plan


def record_plan(model: nn.Module, plan: Mapping[str, Any]) -> None:
    """Tell the integrations (:func:`register_plan_hooks`) that ``model`` now carries ``plan``."""
    for write in _PLAN_WRITERS:
        write(model, plan)


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
    earlier_plan = _earlier_plan(model)
    reference = None
    if check:
        # A trace made just now ran the model as it is (eval mode, no gradients): its output is the
        # reference, with no second run. A cached trace is older than the masks, so the model runs again.
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
        small = _sliced_copy(model, plan)
    small.prunekit_plan = _compose(earlier_plan, plan)
    record_plan(small, small.prunekit_plan)
    if check:
        try:
            result = _run(small, example_inputs)
        except Exception as error:
            raise CompactionError(
                f"the compacted model fails on the example inputs ({type(error).__name__}: {error}). "
                "Its forward probably uses a channel count or index written as a constant (e.g. x[:, :64] or "
                "x.view(n, 512)); exclude the module doing it (exclude=[...]) so its channels stay"
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


def _run_double(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    def widen(value):
        return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    return _run(copy.deepcopy(model).double(), pytree.tree_map(widen, example_inputs))


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
    work = _plan_work(model, plan)
    with torch.no_grad():
        for module, tensor_name, dims in work:
            _replace(module, tensor_name, _sliced(getattr(module, tensor_name), dims))
    _update_shapes(model, [module for module, _, _ in work])
    return model


def _plan_work(model: nn.Module, plan: Mapping[str, Any]) -> list[tuple[nn.Module, str, dict]]:
    """``[(module, tensor name, {dim: kept indices})]`` of a plan, validated against the model."""
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
    return work


def _sliced(tensor: torch.Tensor, dims: Mapping[str, list[int]]) -> torch.Tensor:
    """A new contiguous tensor of the indices a plan keeps along each dimension."""
    new = tensor.detach()
    for dim, indices in dims.items():
        if new.device.type == "meta":
            new = _meta_select(new, int(dim), len(indices))
        else:
            new = new.index_select(int(dim), torch.tensor(indices, dtype=torch.long, device=new.device))
    return new.contiguous()


def _replace(module: nn.Module, tensor_name: str, new: torch.Tensor) -> None:
    old = getattr(module, tensor_name)
    if tensor_name in module._parameters:
        module._parameters[tensor_name] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        module._buffers[tensor_name] = new


def _update_shapes(model: nn.Module, changed: list[nn.Module]) -> None:
    """Size attributes of the sliced modules, and head counts of the attention modules above them."""
    for module in dict.fromkeys(changed):
        update_shape_attributes(module)
    changed_ids = {id(m) for m in changed}
    for module in model.modules():
        if any(id(child) in changed_ids for child in module.children()):
            update_attention_attributes(module)


@torch.no_grad()
def _sliced_copy(model: nn.Module, plan: Mapping[str, Any]) -> nn.Module:
    """A deep copy of ``model`` with the plan applied and no masks, in which every tensor the plan slices
    is copied already sliced (its pruned entries zeroed): no full-size copy of those tensors is made."""
    work = _plan_work(model, plan)
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    memo: dict[int, Any] = {}
    for module, tensor_name, dims in work:
        tensor = getattr(module, tensor_name)
        if id(tensor) in memo:  # shared by two modules: one copy, as deepcopy would make
            continue
        keep = mask_store.get_mask(module, tensor_name) if tensor_name in module._parameters else None
        source = tensor.detach() if keep is None else tensor.detach() * keep
        new = _sliced(source, dims)
        memo[id(tensor)] = (
            nn.Parameter(new, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new
        )
        packed = module._buffers.get(mask_store.mask_buffer_name(tensor_name))
        if packed is not None:
            memo[id(packed)] = packed  # not copied: the copy's mask of a sliced tensor is dropped below
    small = copy.deepcopy(model, memo)
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


_HEAD_DIM = ("head_dim", "key_value_proj_dim", "attention_head_size", "d_kv", "dim_head")
_HEAD_COUNT = ("num_heads", "n_heads", "num_attention_heads", "n_head", "heads")
_KV_HEAD_COUNT = ("num_key_value_heads", "n_kv_heads", "num_kv_heads")
_HEADS_WIDTH = ("all_head_size", "inner_dim", "attn_dim")
_QUERY = ("q_proj", "q", "query", "q_lin", "to_q", "q_attn")
_KEY = ("k_proj", "k", "key", "k_lin", "to_k")


def projection_width(layer: Any) -> int | None:
    """Output width of a projection: an ``nn.Linear``, or Hugging Face's ``Conv1D`` (GPT-2), whose weight
    is stored (in, out)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if is_hf_conv1d(layer) and isinstance(getattr(layer, "weight", None), torch.Tensor):
        return layer.weight.shape[1]
    return None


def attention_head_counts(module: nn.Module) -> tuple[int, int | None, int] | None:
    """``(query heads, key/value heads or None, head size)`` of an attention module written in the
    Hugging Face / timm style (a head-size attribute next to query/key projections, or one fused
    projection computing q, k and v), counted from its projections' current widths; None for any
    other module."""
    head_dim = next((getattr(module, a) for a in _HEAD_DIM if isinstance(getattr(module, a, None), int)), None)
    if not head_dim:
        return None
    query = next((getattr(module, n) for n in _QUERY if projection_width(getattr(module, n, None))), None)
    key = next((getattr(module, n) for n in _KEY if projection_width(getattr(module, n, None))), None)
    fused = getattr(module, "qkv", None) or getattr(module, "c_attn", None)  # timm's qkv, GPT-2's c_attn
    fused_width = projection_width(fused)
    if query is not None:
        width = projection_width(query)
    elif fused_width:
        width = fused_width // 3
    else:
        return None
    if width % head_dim:
        return None
    if key is not None:
        key_width = projection_width(key)
    elif fused_width and query is not None:
        key_width = fused_width // 2  # GPT-2 cross-attention: q_attn makes q, c_attn makes k and v
    else:
        key_width = None
    kv_heads = key_width // head_dim if key_width and key_width % head_dim == 0 else None
    return width // head_dim, kv_heads, head_dim


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
    for name in _HEAD_COUNT:
        if isinstance(getattr(module, name, None), int) and not isinstance(getattr(module, name), bool):
            setattr(module, name, heads)
    for name in _HEADS_WIDTH:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, width)
    if isinstance(getattr(module, "split_size", None), int):
        module.split_size = width
    if kv_heads:
        for name in _KV_HEAD_COUNT:
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


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    sparse: bool = False,
    weight_bits: int | Mapping[str, int | None] | None = None,
    **compressed_options: Any,
):
    """Save a pruned or compacted model as its plan (JSON) and its weights, without pickling the module.

    Without ``sparse``, a path ending in ``.safetensors`` is written with safetensors (``pip install
    safetensors``), the plan in its metadata; any other path with ``torch.save`` of plain tensors and
    strings, which :func:`load_pruned` reads with ``weights_only=True``. Returns None.

    With ``sparse=True`` the file is prunekit's compressed format (:mod:`prunekit.compressed`): each
    tensor as its non-zero values plus the cheapest index form for its pattern, entropy-coded, exact on
    reload; ``weight_bits`` (an int, or a dict per kind ``{"conv": 8, "linear": 5}`` or module-name
    pattern) adds k-means weight sharing (Han et al. 2016). Further options: ``init`` ("linear",
    "density", "random"), ``codebook_dtype`` ("float32", "float16"), ``codec`` ("zstd", "zlib"),
    ``seed``. Returns a :class:`prunekit.compressed.FileReport` (bytes per tensor and per form).
    """
    if sparse:
        if str(path).endswith(".safetensors"):
            raise ValueError(
                "sparse=True writes prunekit's compressed format, not safetensors; use another suffix, e.g. 'model.pk'"
            )
        from .compressed import save_compressed

        return save_compressed(model, path, weight_bits, **compressed_options)
    if weight_bits is not None or compressed_options:
        given = ["weight_bits"] * (weight_bits is not None) + sorted(compressed_options)
        raise ValueError(f"{', '.join(given)} apply to compressed files only; pass sparse=True as well")
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
    """Rebuild a model saved with :func:`save_pruned` (any of its formats): ``model`` is a fresh instance
    of the original, unpruned class (built with the same configuration); its tensors are sliced as the
    plan says, its shape attributes updated, and the saved weights loaded (strictly). Returns ``model``.

    Everything is checked first (the file, then every key and shape against what the plan makes of
    the model): a failed load raises and leaves ``model`` as it was."""
    from .compressed import is_compressed_file, load_compressed, load_into

    if is_compressed_file(path):
        return load_compressed(model, path)
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            plan = json.loads(handle.metadata()["prunekit_plan"])
        state = load_file(str(path))
    else:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            plan, state = json.loads(saved["prunekit_plan"]), saved["state_dict"]
        except Exception as error:
            raise ValueError(
                f"{os.fspath(path)!r} is not a file written by pk.save_pruned, or it is corrupt "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            ) from error
    return load_into(model, plan, state, plan.get("state_metadata", {}))


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give each its own copy."""
    seen: set[int] = set()
    result = {}
    for key, value in state.items():
        pointer = value.data_ptr()
        result[key] = value.clone() if pointer in seen and value.numel() else value
        seen.add(pointer)
    return result
