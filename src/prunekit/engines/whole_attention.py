"""Attention modules that coupled structured pruning leaves whole, and the one warning that says so.

Structured pruning removes attention heads where the trace offers them as units (see
:mod:`prunekit.structure.rules.attention`). Where it offers none for a module that has heads, that
module keeps its full width while the rest of the model is pruned, so the model ends up with a smaller
fraction of its parameters removed than the sparsity asked for implies. :func:`warn_whole_attention`
names those modules and why, in one warning per pruner.

An attention module here is a module with a positive integer head size attribute (``head_dim``,
``attention_head_size``, ... : :data:`prunekit.structure.heads.HEAD_DIM_ATTRIBUTES`) holding at least
one pruned weight (itself or below it) and no such module inside it (the innermost one is reported);
modules the user excluded hold none and are not reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn

from ..core.targets import Target
from ..structure.dependencies import ChannelDependencies
from ..structure.heads import attention_head_counts, head_size


def _inside(name: str, scope: str) -> bool:
    return not scope or name == scope or name.startswith(scope + ".")


def whole_attention(
    model: nn.Module, dependencies: ChannelDependencies, targets: Iterable[Target], min_kept: int = 1
) -> dict[str, str]:
    """``{module name: why}`` of the attention modules (see the module docstring) in which no attention
    head can be removed: the trace offered no head unit there, or no more head units than ``min_kept``
    (every family keeps that many)."""
    attention = {name: module for name, module in model.named_modules() if head_size(module) is not None}
    if not attention:
        return {}
    head_units: dict[str, set[int]] = {}
    is_head = dependencies.unit_is_head
    for piece in dependencies.slices:
        units = piece.unit[piece.unit >= 0]
        heads = units[is_head.index_select(0, units)] if units.numel() else units
        if heads.numel():
            head_units.setdefault(piece.module_name, set()).update(heads.tolist())
    pruned = {target.name for target in targets}
    found: dict[str, str] = {}
    for name, module in attention.items():
        if not any(_inside(t, name) for t in pruned):
            continue
        if any(other != name and _inside(other, name) for other in attention):
            continue  # a wrapper (torchvision's MaxViT partition layer): its inner attention module is the one
        units = set().union(*(u for m, u in head_units.items() if _inside(m, name)))
        if len(units) > min_kept:
            continue
        if units:
            found[name] = (
                f"its heads form {len(units)} unit(s) of structured pruning and every family keeps min_kept={min_kept}"
            )
        elif attention_head_counts(module) is None:
            found[name] = (
                "prunekit cannot count its heads from its projections (a fused projection such as Phi-3's "
                "qkv_proj, which the forward slices into q, k and v at constant positions, is not split into heads)"
            )
        else:
            found[name] = (
                "its heads are coupled to channels that must stay (e.g. attention weights the model returns or "
                "reads, or a head count compaction cannot update)"
            )
    return found


def warn_whole_attention(found: dict[str, str]) -> None:
    """One warning naming every attention module structured pruning leaves whole, and why."""
    if not found:
        return
    by_reason: dict[str, list[str]] = {}
    for name, why in found.items():
        by_reason.setdefault(why, []).append(repr(name))
    listed = "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items())
    warnings.warn(
        f"structured pruning removes no attention head in {len(found)} attention module(s), which keep their "
        f"full width: {listed}. Only their other channels are pruned, so the model reaches a lower share of "
        "pruned parameters than the sparsity asked for; pass sparsity_in='params' to aim at a share of "
        "parameters, or exclude=[...] these modules to say they stay whole and silence this warning",
        UserWarning,
        stacklevel=3,
    )
