"""Which layers are pruned: finding targets, ``include``/``exclude`` and per-layer sparsity overrides.

A *target* is one weight tensor to prune (``module.weight``). By default every ``nn.Linear``,
``nn.ConvNd`` and ``nn.ConvTransposeNd`` is a target, and so are the weights that act as Linear layers
in two common modules: Hugging Face's ``Conv1D`` (GPT-2; weight stored (in, out)) and the query/key/value
projection of ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight`` when the key and
value widths differ; its ``out_proj`` is an ``nn.Linear`` anyway). ``include``/``exclude`` take module types
(matched with ``isinstance``) and/or name patterns (regular expressions). A name pattern matches a
module when it matches the module's full name (``re.fullmatch``) **or the name of one of its
parents**, so ``"classifier"`` selects ``classifier`` and everything inside it (``classifier.6``)
but not ``classifier2``. Name patterns select among the default types and the types listed in
``include`` (``include=[nn.Embedding]`` opts embeddings in).

Every target is seen by the granularities through an ``(O, I, K)`` view of its weight: O output
units (neurons, filters), I input units (features, channels per group) and K kernel positions
(1 for a Linear). ``ConvTranspose`` weights are stored ``(in, out/groups, *kernel)`` and are
transposed into that view.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import LayerHandler, handler_for, is_hf_conv1d

__all__ = ["LayerSelector", "Target", "check_sparsity", "find_targets", "is_hf_conv1d", "name_matches"]

LayerSelector = type | str

#: The handler of a type named in ``include=`` that the layer registry does not know: its ``weight``.
_INCLUDED_TYPE = LayerHandler(default_target=False)


@dataclass(eq=False)
class Target:
    """One prunable weight: ``module.<param_name>`` where ``module`` is called ``name`` in the model.
    ``handler`` is the module's :class:`~prunekit.core.layers.LayerHandler`."""

    name: str
    module: nn.Module
    param_name: str = "weight"
    handler: LayerHandler = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self):
        if self.handler is None:
            self.handler = handler_for(self.module) or _INCLUDED_TYPE

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.param_name)

    @property
    def full_name(self) -> str:
        return self.name_of(self.param_name)

    def name_of(self, param_name: str) -> str:
        """The model-level name of one of this module's parameters, e.g. ``"features.0.bias"``."""
        return f"{self.name}.{param_name}" if self.name else param_name

    @property
    def transposed(self) -> bool:
        """True when the weight is stored (in, out, ...): ConvTranspose and Hugging Face's Conv1D."""
        return self.handler.transposed

    @property
    def oik_shape(self) -> tuple[int, int, int]:
        """(output units, input units, kernel positions) of the weight."""
        shape = self.param.shape
        out_dim, in_dim = (shape[1], shape[0]) if self.transposed else (shape[0], shape[1])
        return out_dim, in_dim, math.prod(shape[2:])

    def to_oik(self, tensor: torch.Tensor) -> torch.Tensor:
        """View a tensor of the weight's shape as (O, I, K)."""
        if self.transposed:
            tensor = tensor.transpose(0, 1)
        return tensor.reshape(self.oik_shape)

    def from_oik(self, tensor: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_oik`: back to the weight's own shape."""
        shape = self.param.shape
        if self.transposed:
            return tensor.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1).contiguous()
        return tensor.reshape(shape)

    def scoring_weight(self) -> torch.Tensor:
        """The float values criteria score (the weight itself, or a quantized layer's real values)."""
        return self.handler.scoring_weight(self.module, self.param_name)

    @property
    def bias_name(self) -> str | None:
        """The name of the bias that belongs to this weight's outputs (None if it has none)."""
        return self.handler.bias_name(self.param_name)

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.module, self.bias_name, None) if self.bias_name else None
        return bias if isinstance(bias, nn.Parameter) else None


def _names_with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))] if name else [""]


def name_matches(pattern: str, module_name: str) -> bool:
    """True if ``pattern`` fully matches ``module_name`` or the name of one of its parent modules."""
    return any(re.fullmatch(pattern, candidate) for candidate in _names_with_parents(module_name))


def selector_matches(selector: LayerSelector, name: str, module: nn.Module) -> bool:
    if isinstance(selector, type):
        return isinstance(module, selector)
    return name_matches(selector, name)


def selector_list(selectors: LayerSelector | Iterable[LayerSelector] | None, what: str) -> list[LayerSelector]:
    if selectors is None:
        return []
    if isinstance(selectors, (str, type)):
        selectors = [selectors]
    if not isinstance(selectors, Iterable):  # reliability (issue 10, defect 13): say what it takes
        raise TypeError(
            f"{what} takes a module type, a name pattern (str) or a list of them, e.g. {what}=['features', nn.Linear]; "
            f"got {selectors!r} of type {type(selectors).__name__}"
        )
    items = list(selectors)
    for item in items:
        if not isinstance(item, (str, type)):
            raise TypeError(
                f"{what} takes module types or name patterns (str), got {item!r} of type {type(item).__name__}"
            )
        if isinstance(item, str):
            try:
                re.compile(item)
            except re.error as err:
                raise ValueError(f"{what} pattern {item!r} is not a valid regular expression: {err}") from None
    return items


def _prunable_weights(module: nn.Module, included_types: tuple[type, ...]) -> tuple[LayerHandler | None, list[str]]:
    """The module's handler and the names of its own weights that are pruning targets (none if it is
    not a targeted kind: registered with ``default_target``, or a type named in ``include``)."""
    handler = handler_for(module)
    included = isinstance(module, included_types)
    if handler is None:
        handler = _INCLUDED_TYPE if included else None
    if handler is None or not (handler.default_target or included):
        return handler, []
    return handler, handler.prunable_weights(module)


def find_targets(
    model: nn.Module,
    include: LayerSelector | Iterable[LayerSelector] | None = None,
    exclude: LayerSelector | Iterable[LayerSelector] | None = None,
) -> list[Target]:
    """List the weights to prune, in module order.

    Raises ``ValueError`` when an ``include`` entry matches no prunable layer or an ``exclude`` entry
    matches no module at all (a typo would otherwise silently prune everything or nothing), and when
    nothing is left to prune. An ``exclude`` entry may name any module (an LSTM that structured pruning
    must leave whole, say), since excluding a module also keeps it out of structured pruning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    includes = selector_list(include, "include")
    excludes = selector_list(exclude, "exclude")
    included_types = tuple(item for item in includes if isinstance(item, type))

    candidates = []
    for name, module in model.named_modules():
        handler, weights = _prunable_weights(module, included_types)
        if weights:
            candidates.append((name, module, handler, weights))
    for selector in includes:
        if not any(selector_matches(selector, name, module) for name, module, _, _ in candidates):
            raise ValueError(
                f"include entry {_shown(selector)} matches no prunable layer (prunable layers: "
                f"{preview_names(name for name, *_ in candidates)}); fix or remove it"
            )
    for selector in excludes:
        if not any(selector_matches(selector, name, module) for name, module in model.named_modules()):
            raise ValueError(
                f"exclude entry {_shown(selector)} matches no module of the model (prunable layers: "
                f"{preview_names(name for name, *_ in candidates)}); fix or remove it"
            )

    targets, seen = [], set()
    for name, module, handler, weights in candidates:
        if includes and not any(selector_matches(s, name, module) for s in includes):
            continue
        if any(selector_matches(s, name, module) for s in excludes):
            continue
        for param_name in weights:
            weight = getattr(module, param_name)
            if id(weight) in seen:  # a weight shared by several modules (tied weights) is one target
                continue
            seen.add(id(weight))
            targets.append(Target(name, module, param_name, handler))
    if not targets:
        raise ValueError(
            "nothing to prune: the model has no Linear/Conv layer left after include/exclude "
            "(name other layer types in include=, e.g. include=[nn.Embedding], or register yours with "
            "pk.register_layer)"
        )
    return targets


def _shown(selector: LayerSelector) -> str:
    return selector.__name__ if isinstance(selector, type) else repr(selector)


def preview_names(names: Iterable[str], limit: int = 8) -> str:
    names = [n or "<root>" for n in names]
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "") if names else "none"


def resolve_layer_sparsity(targets: list[Target], overrides: Mapping[str, float] | None) -> dict[str, float]:
    """Map each overridden target's name to its own sparsity; the first matching pattern wins."""
    if not overrides:
        return {}
    if not isinstance(overrides, Mapping):
        owl = overrides == "owl" or type(overrides).__name__ == "OWL"
        hint = (
            "; OWL's layer sparsities come from calibration activations: use pk.prune(model, sparsity, "
            "criterion='wanda' or 'sparsegpt', calibration=batches, layer_sparsity='owl')"
            if owl
            else ""
        )
        raise TypeError(f"layer_sparsity takes a dict {{name pattern: sparsity}}, got {overrides!r}{hint}")
    resolved: dict[str, float] = {}
    for pattern, value in overrides.items():
        if not isinstance(pattern, str):  # reliability (issue 10, defect 13): keys are name patterns
            raise TypeError(
                f"layer_sparsity keys are layer name patterns (str), e.g. {{'{pattern}': {value!r}}}; "
                f"got {pattern!r} of type {type(pattern).__name__}"
            )
        selector_list(pattern, "layer_sparsity")
        check_sparsity(value, f"layer_sparsity[{pattern!r}]")
        matched = [t for t in targets if name_matches(pattern, t.name)]
        if not matched:
            raise ValueError(
                f"layer_sparsity pattern {pattern!r} matches no pruned layer "
                f"(pruned layers: {preview_names(t.name for t in targets)})"
            )
        for target in matched:
            resolved.setdefault(target.name, float(value))
    return resolved


def check_sparsity(value: object, what: str = "sparsity") -> float:
    """Validate a sparsity: a fraction of units to prune in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number in [0, 1) (the fraction of units to prune), got {value!r}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        hint = " (it is a fraction: 90% is 0.9)" if 1.0 < value <= 100.0 else ""
        raise ValueError(f"{what} must be in [0, 1), got {value}{hint}")
    return value
