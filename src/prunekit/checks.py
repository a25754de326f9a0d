"""Checks on what a user hands to prunekit: models, parameters and options it cannot honour.

Every kind of module or parameter prunekit meets is decided here deliberately: honoured, refused
with an error that says what to do, or reported with a warning that says what to do. Nothing is
skipped silently. The decisions (each has a test in ``tests/test_module_kinds.py`` or
``tests/test_reliability.py``):

- ``nn.DataParallel`` / ``DistributedDataParallel`` / ``torch.compile`` wrappers: refused by the
  pruner and by :func:`prunekit.compact`; prune the wrapped model (``model.module``,
  ``model._orig_mod``) before wrapping or compiling, so layer names match and compaction can change
  shapes.
- Reparametrized weights of a layer prunekit would prune (``torch.nn.utils.parametrize``, including
  the new ``weight_norm`` and ``spectral_norm``; the legacy hook-based ``weight_norm`` /
  ``spectral_norm``; leftovers of ``torch.nn.utils.prune``): refused, naming the layer and the call
  that removes the reparametrization, because the stored ``weight`` is recomputed in every forward
  and a mask on it would not hold. ``include=`` may leave such layers out; reparametrized modules
  prunekit does not prune (a LayerNorm) are fine.
- Quantized layers (``torch.ao.nn.quantized``, packed int8 weights): refused; prune the float model,
  then quantize. Fake-quant (QAT) layers keep a float weight and are honoured: a pruned zero stays
  zero through the fake quantization, since 0 is exactly representable.
- Parameters on the meta device: refused (there are no values to score); tracing a meta model with
  :func:`prunekit.trace_dependencies` still works.
- NaN or inf in any tensor pruning touches (weights, biases, norm parameters and running statistics
  masked or sliced with their channels): refused, naming the layer and tensor, because 0 · NaN is
  NaN. :func:`prunekit.compact` refuses NaN or inf outputs instead of passing its check.
- Frozen, tied, fp16 / bf16 and channels_last parameters are honoured (masks are applied in place;
  compaction keeps ``requires_grad``, dtype, memory format, and slices a tied tensor once for all
  its owners).
- A second pruner over parameters that already carry prunekit masks: honoured (it keeps them, since
  masks only grow), with a warning that the masks are shared; pruners on disjoint layers are quiet.
- Options that do not apply to the chosen mode are refused: ``round_to``, ``max_layer_sparsity``,
  ``prune_outputs`` outside coupled structured pruning; ``coupled=False`` with another granularity
  than ``"out_channel"``; ``seed`` with a criterion other than ``"random"``; on/off options that are
  not booleans. ``granularity="out_channel"`` without ``example_inputs`` warns.
- Layers no model output depends on for the example inputs (they do not run, or nothing reads their
  output, such as an unused pooler) are pruned like the others, with a warning naming them.
- :func:`prunekit.compact` warns when it removes nothing (unstructured masks), refuses a plan that
  would leave a layer with no channels (``min_kept=0``), and validates ``tolerance``.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from .core.layers import is_hf_conv1d
from .core.masks import mask_buffer_name
from .core.targets import Target, name_matches
from .structure.dependencies import ChannelDependencies

#: The layer kinds prunekit prunes by default (ConvTranspose is a _ConvNd too).
DEFAULT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

#: Wrappers whose own forward only forwards to ``.module`` (data parallelism).
_PARALLEL_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def check_model(model: nn.Module, include: Any = None) -> None:
    """Refuse models prunekit cannot prune as given (see the module docstring): wrapped or compiled
    models, and layers of a prunable kind whose weight is reparametrized or quantized, unless
    ``include`` (module types or name patterns, as for the pruner) leaves them out."""
    if not isinstance(model, nn.Module):
        return  # find_targets says what a model must be
    check_unwrapped(model)
    selectors = _lenient_selectors(include)
    layer_types = DEFAULT_TYPES + (nn.MultiheadAttention,) + tuple(s for s in selectors if isinstance(s, type))
    for name, module in model.named_modules():
        if not _is_layer(module, layer_types):
            continue
        problem = _unprunable_reason(module)
        if problem is None:
            continue
        if selectors and not any(_selected(s, name, module) for s in selectors):
            continue
        shown = name or "<root>"
        raise ValueError(f"layer {shown!r} ({type(module).__name__}) {problem}; or leave it out with include=[...]")


def check_unwrapped(model: nn.Module) -> None:
    """Refuse data-parallel wrappers and ``torch.compile``'s wrapper: prunekit works on the model inside."""
    if isinstance(model, _PARALLEL_WRAPPERS):
        raise TypeError(
            f"model is wrapped in {type(model).__name__}: prune the wrapped model instead "
            "(pk.Pruner(model.module, ...)), before wrapping it, so layer names match and compaction can change shapes"
        )
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise TypeError(
            "model was compiled with torch.compile: prune the original model instead (pk.Pruner(model._orig_mod, ...)) "
            "and compile it after pruning (and after pk.compact, which changes shapes)"
        )


#: Quantized layer classes are not subclasses of the float ones; they share their names.
_LAYER_NAMES = {t.__name__ for t in DEFAULT_TYPES} | {"LinearReLU", "ConvReLU1d", "ConvReLU2d", "ConvReLU3d"}


def _is_layer(module: nn.Module, layer_types: tuple[type, ...]) -> bool:
    """A module prunekit would prune (a Linear, conv, attention or an included type), quantized or not."""
    return isinstance(module, layer_types) or is_hf_conv1d(module) or type(module).__name__ in _LAYER_NAMES


def _unprunable_reason(module: nn.Module) -> str | None:
    """Why this module's weight cannot be masked in place, with what to do (None if it can, or is not a layer)."""
    parametrized = getattr(module, "parametrizations", None)
    if isinstance(parametrized, nn.ModuleDict) and len(parametrized):
        names = ", ".join(map(repr, parametrized))
        return (
            f"has a parametrization on {names} (torch.nn.utils.parametrize, e.g. weight_norm or spectral_norm): "
            "its weight is recomputed in every forward, so a mask would not hold. Remove it first with "
            "torch.nn.utils.parametrize.remove_parametrizations(module, name, leave_parametrized=True)"
        )
    for hook in module._forward_pre_hooks.values():
        kind = type(hook).__name__
        if isinstance(hook, torch_prune.BasePruningMethod):
            return (
                f"still carries torch.nn.utils.prune's {hook._tensor_name}_orig and {hook._tensor_name}_mask: "
                f"make that pruning permanent first with torch.nn.utils.prune.remove(module, {hook._tensor_name!r})"
            )
        if kind == "WeightNorm":
            return (
                "uses the legacy torch.nn.utils.weight_norm (weight_g, weight_v): its weight is recomputed in every "
                "forward. Remove it first with torch.nn.utils.remove_weight_norm(module)"
            )
        if kind == "SpectralNorm":
            return (
                "uses the legacy torch.nn.utils.spectral_norm (weight_orig): its weight is recomputed in every "
                "forward. Remove it first with torch.nn.utils.remove_spectral_norm(module)"
            )
    if type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")) and (
        hasattr(module, "_packed_params") or hasattr(module, "weight")
    ):
        return (
            "is quantized: its int8 weights are packed and cannot be masked. Prune the float model first, "
            "then quantize it (pk.prune, then torch.ao.quantization)"
        )
    return None


def _lenient_selectors(include: Any) -> list:
    """``include`` as a list of types and compilable patterns; anything else is left for
    :func:`prunekit.targets.find_targets` to refuse with its own message."""
    if include is None:
        return []
    items = [include] if isinstance(include, (str, type)) else include
    if not isinstance(items, Iterable):
        return []
    found = []
    for item in items:
        if isinstance(item, type):
            found.append(item)
        elif isinstance(item, str):
            try:
                re.compile(item)
            except re.error:
                continue
            found.append(item)
    return found


def _selected(selector, name: str, module: nn.Module) -> bool:
    return isinstance(module, selector) if isinstance(selector, type) else name_matches(selector, name)


def check_targets_have_values(targets: Iterable[Target]) -> None:
    """Refuse weights on the meta device: they have no values to score. A layer that accelerate offloads
    (its ``_hf_hook`` loads the weights for each call, from CPU memory or disk) is not refused: the
    calibrated one-shot methods read its weights through that hook (:mod:`prunekit.oneshot.offload`)."""
    for target in targets:
        if target.param.device.type == "meta" and getattr(target.module, "_hf_hook", None) is None:
            raise ValueError(
                f"layer {target.name or '<root>'!r} has its weights on the meta device, where there are no values "
                "to score: materialise the model first (model.to_empty(device=...) and load its weights); "
                "pk.trace_dependencies works on meta models"
            )


def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse NaN or inf in any of these tensors (everything that pruning masks or slices): a pruned
    NaN stays NaN (0 · NaN = NaN), so the masked model would output NaN."""
    for name, tensor in named_tensors:
        values = tensor.detach()
        if not values.is_floating_point() or values.device.type == "meta" or not values.numel():
            continue
        # A sum is a cheap test; only when it is not finite is the exact (slower) test needed.
        if not math.isfinite(float(values.sum())) and not bool(torch.isfinite(values).all()):
            layer, _, tensor_name = name.rpartition(".")
            raise ValueError(
                f"layer {layer or '<root>'!r} has NaN or inf values in {tensor_name!r}; fix the model (or exclude "
                "that layer) before pruning, since a pruned NaN stays NaN (0 · NaN = NaN)"
            )


def check_options(
    granularity_name: str,
    coupled: bool,
    example_inputs: Any,
    prune_outputs: bool,
    criterion_name: str = "magnitude",
    seed: object = 0,
    mask_gradients: object = False,
) -> None:
    """Refuse options that do not apply to the chosen mode (or are not the type they must be: a
    string such as "no" would read as True), and warn when ``granularity="out_channel"`` falls back
    to per-layer masks for lack of ``example_inputs``."""
    is_out_channel = granularity_name == "out_channel"
    check_flags(coupled=coupled, prune_outputs=prune_outputs, mask_gradients=mask_gradients)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be a whole number (it seeds the 'random' criterion), got {seed!r}")
    if seed is not None and criterion_name != "random":
        raise ValueError(
            f"seed={seed} seeds the 'random' criterion only, and criterion {criterion_name!r} is deterministic; "
            "remove seed= or use criterion='random'"
        )
    if not coupled and not is_out_channel:
        raise ValueError(
            f"coupled=False applies to granularity='out_channel' only (got granularity {granularity_name!r}); remove it"
        )
    if is_out_channel and coupled and example_inputs is None:
        warnings.warn(
            "granularity='out_channel' without example_inputs prunes each layer's filters on its own (masks only), "
            "which pk.compact can remove only partly: pass example_inputs=... for coupled pruning, or coupled=False "
            "to silence this warning",
            UserWarning,
            stacklevel=3,
        )
    # round_to, max_layer_sparsity, prune_outputs, sparsity_in and prune_only outside coupled mode are
    # refused by the pruner's assembly (prunekit.assembly), which knows the structured options.


def check_flags(**flags: object) -> None:
    """Refuse on/off options that are not True or False."""
    for name, value in flags.items():
        if value is not True and value is not False:
            raise TypeError(f"{name} must be True or False, got {value!r}")


def check_tolerance(tolerance: object) -> float:
    """Validate :func:`prunekit.compact`'s ``tolerance``: a finite fraction ≥ 0 of the output scale."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"tolerance must be a number ≥ 0 (a fraction of the output scale), got {tolerance!r}")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(
            f"tolerance must be a finite number ≥ 0 (a fraction of the output scale, e.g. 1e-4), got {tolerance}; "
            "to skip the check pass check=False"
        )
    return float(tolerance)


@contextlib.contextmanager
def record_calls(model: nn.Module) -> Iterator[set[int]]:
    """Within the block, collect ``id()`` of every module of ``model`` that runs (forward hooks,
    removed on exit)."""
    ran: set[int] = set()
    handles = [m.register_forward_hook(lambda module, args, out: ran.add(id(module))) for m in model.modules()]
    try:
        yield ran
    finally:
        for handle in handles:
            handle.remove()


def unreached_layers(
    dependencies: ChannelDependencies, targets: Iterable[Target], ran: set[int], prune_outputs: bool
) -> list[str]:
    """Names of the targets no model output depends on, read off a trace: layers that did not run
    (``ran`` holds the ids of the modules that ran while tracing; empty when the trace came from the
    cache, and then this part is skipped), and layers whose output channels nothing reads (no
    consumer slice outside such layers), such as an unused pooler. Without ``prune_outputs`` a unit
    that reaches an output is not removable and so never looks unread."""
    targets = list(targets)
    # Some modules' weights are used without calling them (nn.MultiheadAttention's out_proj), so a
    # layer counts as not run only when, besides, the trace saw none of its tensors.
    traced = {piece.module_name for piece in dependencies.slices}
    dead = {t.name for t in targets if ran and id(t.module) not in ran and t.name not in traced}
    if not prune_outputs:
        readers: dict[str, set[str]] = {}
        family_units = dependencies.unit_family
        for piece in dependencies.slices:
            if piece.consumer:
                units = piece.unit[piece.unit >= 0]
                for family in torch.unique(family_units[units]).tolist():
                    readers.setdefault(dependencies.families[family].rpartition(".")[0], set()).add(piece.module_name)
        producers = [name.rpartition(".")[0] for name in dependencies.families]
        changed = True
        while changed:  # a layer read only by unread layers is unread too
            changed = False
            for producer in producers:
                if producer not in dead and readers.get(producer, set()) <= dead:
                    dead.add(producer)
                    changed = True
    return [t.name or "<root>" for t in targets if t.name in dead]


def check_has_units(dependencies: ChannelDependencies, sparsity: float, prune_outputs: bool) -> None:
    """Refuse coupled structured pruning to a sparsity above 0 of a model with no removable unit,
    which would otherwise prune nothing without a word."""
    if sparsity > 0 and dependencies.num_units == 0:
        hint = (
            ""
            if prune_outputs
            else "every channel reaches a model output (prune_outputs=True allows removing those), or "
        )
        raise ValueError(
            f"coupled structured pruning found no removable channel, neuron or head in this model: {hint}the channels "
            "pass through an op after which a zeroed channel is not zero (e.g. BatchNorm with affine=False). Prune "
            "with coupled=False (masks only), or use another granularity"
        )


def warn_existing_masks(maskable: Iterable[tuple[nn.Module, str, str]]) -> None:
    """Warn when parameters a new pruner will mask already carry prunekit masks (a second pruner on
    one model, or a model saved with its masks): they are kept and shared, which is easy to trip on."""
    names = [full for module, param, full in maskable if mask_buffer_name(param) in module._buffers]
    if names:
        shown = names if len(names) <= 4 else [*names[:4], f"… ({len(names)} in all)"]
        warnings.warn(
            f"{shown} already carry prunekit masks (from an earlier pk.prune / pk.Pruner): this pruner keeps them "
            "(masks only grow) and shares them, so either pruner's remove() drops them for both. To prune further, "
            "prefer the existing pruner's prune(sparsity=...)",
            UserWarning,
            stacklevel=3,
        )


def warn_unreached(names: list[str]) -> None:
    """Warn that these layers are pruned though no output depends on them."""
    if names:
        warnings.warn(
            f"layers {names} affect none of the model's outputs for these example_inputs (they do not run, or "
            "their outputs are discarded, e.g. an unused pooler): their units are pruned like the others' and "
            "change nothing the model returns. Leave them out with exclude=[...], or delete them from the model",
            UserWarning,
            stacklevel=3,
        )
