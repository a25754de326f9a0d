"""Configuration objects: small frozen dataclasses, validated on construction, with ``to_dict`` /
``from_dict`` (plain JSON-able values), so a pruner's configuration can be saved beside its state,
compared on load and written as a recipe.

- :class:`StructuredOptions`: the options of coupled structured pruning;
- :class:`PruningConfig`: everything a :class:`prunekit.Pruner` was built with, described by names
  (a criterion, a granularity, module types by their qualified names), so two configurations compare
  field by field and :meth:`PruningConfig.differences` says which fields differ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

#: What ``sparsity`` counts with coupled structured pruning.
SPARSITY_MEASURES = ("channels", "params", "macs")
#: Which units coupled structured pruning may remove (None: all of them).
PRUNE_ONLY = (None, "heads", "width")


def _whole(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be a whole number ≥ {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class StructuredOptions:
    """Options of coupled structured pruning (``granularity="out_channel"`` with ``example_inputs``).

    Attributes:
        coupled: prune whole dependency groups (True) or each layer's filters on their own (False).
        prune_outputs: let pruning remove channels that reach a model output.
        round_to: keep every family's channel count a multiple of this (channels).
        max_layer_sparsity: the largest fraction of any one family's units that may go.
        sparsity_in: what ``sparsity`` is a fraction of: "channels" (units), "params" or "macs".
        prune_only: "heads", "width" or None (both).
    """

    coupled: bool = True
    prune_outputs: bool = False
    round_to: int = 1
    max_layer_sparsity: float = 1.0
    sparsity_in: str = "channels"
    prune_only: str | None = None

    def __post_init__(self):
        for name in ("coupled", "prune_outputs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _whole(self.round_to, "round_to (channels)", 1)
        value = self.max_layer_sparsity
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"max_layer_sparsity must be a fraction in [0, 1], got {value!r}")
        object.__setattr__(self, "max_layer_sparsity", float(value))
        if self.sparsity_in not in SPARSITY_MEASURES:
            raise ValueError(
                f"unknown sparsity_in {self.sparsity_in!r}; valid values are {', '.join(map(repr, SPARSITY_MEASURES))}"
            )
        if self.prune_only not in PRUNE_ONLY:
            raise ValueError(
                f"unknown prune_only {self.prune_only!r}; valid values are {', '.join(map(repr, PRUNE_ONLY))}"
            )

    def changed(self) -> list[str]:
        """Names of the options set away from their defaults (``coupled`` aside)."""
        default = StructuredOptions()
        return [
            f.name for f in fields(self) if f.name != "coupled" and getattr(self, f.name) != getattr(default, f.name)
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredOptions:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class PruningConfig:
    """What a pruner was built with, by name (see the module docstring). Built by the pruner; use
    :meth:`to_dict` / :meth:`from_dict` to store it."""

    sparsity: float
    criterion: str = "magnitude"
    granularity: str | dict[str, list[int]] = "weight"
    scope: str = "local"
    schedule: dict[str, Any] = field(default_factory=lambda: {"one_shot": {"at": 0}})
    layer_sparsity: dict[str, float] | str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_kept: int = 1
    structured: StructuredOptions = field(default_factory=StructuredOptions)
    max_fan_in: int | str | None = None
    seed: int | None = None
    mask_gradients: bool = False

    #: Fields that change how masks are enforced, not which masks: a saved state loads across them.
    RUNTIME_FIELDS = ("mask_gradients",)

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or math.isnan(self.sparsity):
            raise ValueError(f"sparsity must be a number, got {self.sparsity!r}")
        _whole(self.min_kept, "min_kept (units)", 0)
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["include"], data["exclude"] = list(self.include), list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        values = _known(cls, data)
        if isinstance(values.get("structured"), dict):
            values["structured"] = StructuredOptions.from_dict(values["structured"])
        return cls(**values)

    def differences(self, other: PruningConfig) -> list[str]:
        """``"field: this → other"`` for every field whose value differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        found = []
        for key in mine:
            if key in self.RUNTIME_FIELDS:
                continue
            if key == "structured":
                for option, value in mine[key].items():
                    if theirs[key].get(option) != value:
                        found.append(f"{option}: {value!r} → {theirs[key].get(option)!r}")
            elif mine[key] != theirs.get(key):
                found.append(f"{key}: {mine[key]!r} → {theirs.get(key)!r}")
        return found


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}.from_dict takes a dict, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid ones are {sorted(names)}")
    return dict(data)


#: How a configuration names a module type given in include/exclude (patterns stay as they are).
TYPE_PREFIX = "type:"


def selector_name(selector: object) -> str:
    """A module type as ``type:<qualified name>`` (``type:torch.nn.modules.sparse.Embedding``), a name
    pattern as itself."""
    if isinstance(selector, type):
        return f"{TYPE_PREFIX}{selector.__module__}.{selector.__qualname__}"
    return str(selector)
