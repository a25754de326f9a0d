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

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

LayerSelector = type | str


#: The projection weights of nn.MultiheadAttention, with the bias that goes with each.
_ATTENTION_WEIGHTS = {
    "in_proj_weight": "in_proj_bias",
    "q_proj_weight": None,
    "k_proj_weight": None,
    "v_proj_weight": None,
}


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's projections): a Linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)


@dataclass(eq=False)
class Target:
    """One prunable weight: ``module.<param_name>`` where ``module`` is called ``name`` in the model."""

    name: str
    module: nn.Module
    param_name: str = "weight"

    @property
    def param(self) -> nn.Parameter:
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
        return isinstance(self.module, _TRANSPOSED) or is_hf_conv1d(self.module)

    @property
    def oik_shape(self) -> tuple[int, int, int]:
        """(output units, input units, kernel positions) of the weight."""
        shape = self.param.shape
        out_dim, in_dim = (shape[1], shape[0]) if self.transposed else (shape[0], shape[1])
        kernel = 1
        for size in shape[2:]:
            kernel *= size
        return out_dim, in_dim, kernel

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

    @property
    def bias_name(self) -> str | None:
        """The name of the bias that belongs to this weight's outputs (None if it has none)."""
        return _ATTENTION_WEIGHTS.get(self.param_name) if self.param_name in _ATTENTION_WEIGHTS else "bias"

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


def _matches(selector: LayerSelector, name: str, module: nn.Module) -> bool:
    if isinstance(selector, type):
        return isinstance(module, selector)
    return name_matches(selector, name)


def _as_list(selectors: LayerSelector | Iterable[LayerSelector] | None, what: str) -> list[LayerSelector]:
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


def _prunable_weights(module: nn.Module, allowed_types: tuple[type, ...]) -> list[str]:
    """Names of the module's own weights that are pruning targets (none if it is not a targeted type)."""
    if isinstance(module, nn.MultiheadAttention):
        names = list(_ATTENTION_WEIGHTS)
    elif isinstance(module, allowed_types) or is_hf_conv1d(module):
        names = ["weight"]
    else:
        return []
    return [
        n for n in names if isinstance(module._parameters.get(n), nn.Parameter) and module._parameters[n].dim() >= 2
    ]


def find_targets(
    model: nn.Module,
    include: LayerSelector | Iterable[LayerSelector] | None = None,
    exclude: LayerSelector | Iterable[LayerSelector] | None = None,
) -> list[Target]:
    """List the weights to prune, in module order.

    Raises ``ValueError`` when an ``include``/``exclude`` entry matches no prunable layer (a typo would
    otherwise silently prune everything or nothing) and when nothing is left to prune.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    includes = _as_list(include, "include")
    excludes = _as_list(exclude, "exclude")
    allowed_types = DEFAULT_TYPES + tuple(item for item in includes if isinstance(item, type))

    candidates = [(name, module) for name, module in model.named_modules() if _prunable_weights(module, allowed_types)]
    for selector, what in [(s, "include") for s in includes] + [(s, "exclude") for s in excludes]:
        if not any(_matches(selector, name, module) for name, module in candidates):
            shown = selector.__name__ if isinstance(selector, type) else repr(selector)
            raise ValueError(
                f"{what} entry {shown} matches no prunable layer (prunable layers: "
                f"{_preview(name for name, _ in candidates)}); fix or remove it"
            )

    targets, seen = [], set()
    for name, module in candidates:
        if includes and not any(_matches(s, name, module) for s in includes):
            continue
        if any(_matches(s, name, module) for s in excludes):
            continue
        for param_name in _prunable_weights(module, allowed_types):
            weight = module._parameters[param_name]
            if id(weight) in seen:  # a weight shared by several modules (tied weights) is one target
                continue
            seen.add(id(weight))
            targets.append(Target(name, module, param_name))
    if not targets:
        raise ValueError(
            "nothing to prune: the model has no Linear/Conv layer left after include/exclude "
            "(name other layer types in include=, e.g. include=[nn.Embedding])"
        )
    return targets


def _preview(names: Iterable[str], limit: int = 8) -> str:
    names = [n or "<root>" for n in names]
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "") if names else "none"


def resolve_layer_sparsity(targets: list[Target], overrides: Mapping[str, float] | None) -> dict[str, float]:
    """Map each overridden target's name to its own sparsity; the first matching pattern wins."""
    if not overrides:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError("layer_sparsity takes a dict {name pattern: sparsity}")
    resolved: dict[str, float] = {}
    for pattern, value in overrides.items():
        if not isinstance(pattern, str):  # reliability (issue 10, defect 13): keys are name patterns
            raise TypeError(
                f"layer_sparsity keys are layer name patterns (str), e.g. {{'{pattern}': {value!r}}}; "
                f"got {pattern!r} of type {type(pattern).__name__}"
            )
        _as_list(pattern, "layer_sparsity")
        check_sparsity(value, f"layer_sparsity[{pattern!r}]")
        matched = [t for t in targets if name_matches(pattern, t.name)]
        if not matched:
            raise ValueError(
                f"layer_sparsity pattern {pattern!r} matches no pruned layer "
                f"(pruned layers: {_preview(t.name for t in targets)})"
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
