"""Recipes: a pruner's configuration as a YAML file whose keys are :class:`prunekit.Pruner`'s own arguments.

```yaml
# recipes/gradual_90.yaml
sparsity: 0.9
criterion: magnitude
granularity: weight          # or "2:4" (N:M), {block: [1, 16]}, kernel, out_channel, in_channel
scope: global
schedule: {gradual: {start: 0, end: 2000, every: 100}}   # or {iterative: {start, end, rounds}},
                                                         # {iterative_per_round: {fraction, rounds, start, every}},
                                                         # {one_shot: {at: 0}}
layer_sparsity: {classifier: 0.0}
exclude: [classifier]        # name patterns, or torch.nn types by name ("nn.Embedding")
```

``pk.Pruner.from_recipe(model, "r.yaml", **overrides)`` builds the pruner (overrides are more
keyword arguments: ``optimizer=``, ``example_inputs=``, ``data=``, or a recipe value replaced);
``pruner.to_recipe()`` writes its configuration back as YAML, and reading that gives the same
pruner. A ``calibration`` section (``{samples, batch_size, sequence_length, source}``) describes the
data of one-shot methods for tools such as the CLI; the pruner itself takes the batches. A ``study``
section describes the training protocol around the pruner (epochs, optimizer, rounds, seeds, data) of a
shipped recipe; the pruner never reads it: ``prunekit reproduce`` (:mod:`prunekit.bench.studies`)
validates and runs it.

Recipes are read with YAML's safe loader (no object is ever constructed from the file) and validated
with pydantic: an unknown key names itself and the valid ones, a bad value names its key, its line and
what is allowed, and a YAML syntax error gives its line. Needs the ``recipes`` extra (pyyaml, pydantic).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from torch import nn

from .core.config import TYPE_PREFIX, PruningConfig
from .methods.criteria import CRITERIA
from .methods.granularity import get_granularity
from .methods.schedules import Iterative, schedule_from_dict

#: Pruner arguments a recipe may set; the others (model, optimizer, data, ...) are objects, not text.
RECIPE_KEYS = (
    "sparsity", "criterion", "granularity", "scope", "schedule", "layer_sparsity", "include", "exclude",
    "min_kept", "coupled", "prune_outputs", "round_to", "max_layer_sparsity", "sparsity_in", "prune_only",
    "seed", "mask_gradients", "max_fan_in", "calibration", "study",
)  # fmt: skip


#: Calibrated one-shot methods of ``pk.prune`` (:mod:`prunekit.oneshot`) that are not per-weight criteria
#: of the registry; a recipe may name them for ``pk.prune`` and the CLI (the pruner itself refuses them).
ONESHOT_METHODS = ("sparsegpt",)


class RecipeError(ValueError):
    """A recipe that cannot be read: the message says where (file, line, key) and what is allowed."""


def _schema():
    try:
        from pydantic import BaseModel, ConfigDict, Field
    except ImportError as error:  # pragma: no cover - the extra is installed in CI
        raise ImportError("recipes need pydantic and pyyaml: pip install 'prunekit[recipes]'") from error

    class Calibration(BaseModel):
        model_config = ConfigDict(extra="forbid")
        samples: int = Field(128, ge=1)
        batch_size: int = Field(16, ge=1)
        sequence_length: int | None = Field(None, ge=1)
        source: str | None = None

    class Recipe(BaseModel):
        model_config = ConfigDict(extra="forbid")
        sparsity: float | None = Field(None, ge=0.0, lt=1.0)
        criterion: str = "magnitude"
        granularity: str | dict[Literal["block", "nm"], list[int]] = "weight"
        scope: Literal["local", "global", "row"] = "local"
        schedule: (
            dict[Literal["one_shot", "iterative", "iterative_per_round", "gradual"], dict[str, Any] | None] | None
        ) = None
        layer_sparsity: dict[str, float] | Literal["owl"] | None = None
        include: list[str] | str | None = None
        exclude: list[str] | str | None = None
        min_kept: int = Field(1, ge=0)
        coupled: bool = True
        prune_outputs: bool = False
        round_to: int = Field(1, ge=1)
        max_layer_sparsity: float = Field(1.0, ge=0.0, le=1.0)
        sparsity_in: Literal["channels", "params", "macs"] = "channels"
        prune_only: Literal["heads", "width"] | None = None
        seed: int | None = None
        mask_gradients: bool = False
        max_fan_in: int | None = Field(None, ge=1)
        calibration: Calibration | None = None
        study: dict[str, Any] | None = None  # validated by prunekit.bench.studies, which runs it

    return Recipe


def _yaml():
    try:
        import yaml
    except ImportError as error:  # pragma: no cover - the extra is installed in CI
        raise ImportError("recipes need pyyaml and pydantic: pip install 'prunekit[recipes]'") from error
    return yaml


def _key_lines(text: str) -> dict[tuple, int]:
    """Line (1-based) of every mapping key, by its path of keys."""
    yaml = _yaml()
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = path + (key.value,)
                lines[here] = key.start_mark.line + 1
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[path + (index,)] = item.start_mark.line + 1
                walk(item, path + (index,))

    walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    return lines


class Recipe:
    """A validated recipe (see the module docstring). ``values`` holds the keys the recipe sets."""

    def __init__(self, values: Mapping[str, Any], source: str = "<recipe>"):
        schema = _schema()
        from pydantic import ValidationError

        try:
            parsed = schema.model_validate(dict(values))
        except ValidationError as error:
            raise RecipeError(_explain(error, source, getattr(values, "lines", {}))) from None
        self.source = source
        self.values = parsed.model_dump(exclude_unset=True)
        self._lines = getattr(values, "lines", {})
        self._check_names()

    def _where(self, key: str) -> str:
        line = self._lines.get((key,))
        return f"{self.source}, line {line}" if line else self.source

    def _check_names(self) -> None:
        criterion = self.values.get("criterion")
        if criterion is not None and criterion not in CRITERIA and criterion not in ONESHOT_METHODS:
            valid = ", ".join(sorted([*CRITERIA, *ONESHOT_METHODS]))
            raise RecipeError(
                f"{self._where('criterion')}: criterion {criterion!r} is not registered; valid names are {valid}"
            )
        for key in ("granularity", "schedule", "include", "exclude"):
            if key in self.values:
                try:
                    self.pruner_arguments()
                except (TypeError, ValueError) as error:
                    raise RecipeError(f"{self._where(key)}: {key}: {error}") from None

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The recipe's calibration settings (for tools that build the batches), or None."""
        return self.values.get("calibration")

    @property
    def study(self) -> dict[str, Any] | None:
        """The recipe's training protocol (for ``prunekit reproduce``), unvalidated here, or None."""
        return self.values.get("study")

    def where(self, path: tuple = ()) -> str:
        """``"<file>, line N"`` of the key at ``path`` (or of its nearest enclosing key), for messages."""
        path = tuple(path)
        while path and path not in self._lines:
            path = path[:-1]
        return f"{self.source}, line {self._lines[path]}" if path else self.source

    def pruner_arguments(self) -> dict[str, Any]:
        """Keyword arguments for :class:`prunekit.Pruner` (schedule and granularity built, module types
        named in include/exclude resolved in ``torch.nn``; the ``calibration`` and ``study`` sections are
        not pruner arguments)."""
        arguments = {k: v for k, v in self.values.items() if k not in ("calibration", "study")}
        if "granularity" in arguments:
            arguments["granularity"] = get_granularity(arguments["granularity"])
        schedule = arguments.pop("schedule", None)
        if schedule:
            ((name, options),) = schedule.items()
            if name == "iterative_per_round":
                built, final = Iterative.per_round(**(options or {}))
                arguments.setdefault("sparsity", final)
                arguments["schedule"] = built
            else:
                arguments["schedule"] = schedule_from_dict({name: options or {}})
        for key in ("include", "exclude"):
            if key in arguments and arguments[key] is not None:
                entries = [arguments[key]] if isinstance(arguments[key], str) else arguments[key]
                arguments[key] = [_module_type(entry) for entry in entries]
        return arguments

    def to_yaml(self) -> str:
        return _yaml().safe_dump(self.values, sort_keys=False, allow_unicode=True)

    def __repr__(self) -> str:
        return f"Recipe({self.values!r})"


def _module_type(entry: str) -> str | type:
    """``"nn.Embedding"`` / ``"torch.nn.Embedding"`` → the class; anything else stays a name pattern."""
    for prefix in ("torch.nn.", "nn."):
        if entry.startswith(prefix) and entry[len(prefix) :].isidentifier():
            found = getattr(nn, entry[len(prefix) :], None)
            if isinstance(found, type) and issubclass(found, nn.Module):
                return found
            raise ValueError(f"{entry!r} is not a torch.nn module type")
    return entry


class _Lined(dict):
    """A dict that remembers the line of each key path (for error messages)."""

    lines: dict[tuple, int]


def _explain(error, source: str, lines: dict[tuple, int]) -> str:
    parts = []
    for item in error.errors():
        location = tuple(item["loc"])
        while location and location not in lines:
            location = location[:-1]
        line = f", line {lines[location]}" if location in lines else ""
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            valid = ", ".join(RECIPE_KEYS) if len(item["loc"]) == 1 else "see the recipe documentation"
            parts.append(f"{source}{line}: unknown key {key!r}; valid keys are {valid}")
        else:
            parts.append(f"{source}{line}: {key}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(parts)


def load_recipe(recipe: str | os.PathLike | Mapping[str, Any]) -> Recipe:
    """Read and validate a recipe: a YAML file path, YAML text, or a dict of the same keys."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe(recipe)
    yaml = _yaml()
    path = Path(recipe)
    if isinstance(recipe, str) and "\n" in recipe:  # YAML text rather than a path
        text, source = str(recipe), "<recipe>"
    else:
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        text, source = path.read_text(), str(path)
    try:
        values = yaml.safe_load(text)
        lines = _key_lines(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{source}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of pruner arguments, got {type(values).__name__}")
    lined = _Lined(values)
    lined.lines = lines
    return Recipe(lined, source)


def config_to_recipe(config: PruningConfig) -> Recipe:
    """The recipe that builds a pruner of this configuration (built-in schedules and registered
    criteria and granularities only)."""
    try:
        get_granularity(config.granularity)
    except (TypeError, ValueError):
        raise ValueError(
            f"granularity {config.granularity!r} is not registered, so a recipe cannot name it; register it with "
            "pk.register_granularity"
        ) from None
    if config.criterion not in CRITERIA:
        raise ValueError(
            f"criterion {config.criterion!r} is not registered, so a recipe cannot name it; register it with "
            "pk.register_criterion"
        )
    if "custom" in config.schedule:
        raise ValueError("a recipe describes the built-in schedules only (OneShot, Iterative, Gradual)")
    if isinstance(config.max_fan_in, str):
        raise ValueError("a recipe holds max_fan_in as a whole number of weights, not an AccumulatorBudget")
    values: dict[str, Any] = {
        "sparsity": config.sparsity,
        "criterion": config.criterion,
        "granularity": config.granularity,
        "scope": config.scope,
        "schedule": config.schedule,
    }
    if config.layer_sparsity:
        values["layer_sparsity"] = config.layer_sparsity
    for key in ("include", "exclude"):
        entries = getattr(config, key)
        if entries:
            values[key] = [_type_name(entry) for entry in entries]
    if config.min_kept != 1:
        values["min_kept"] = config.min_kept
    structured = config.structured.to_dict()
    for key in config.structured.changed() + ([] if config.structured.coupled else ["coupled"]):
        values[key] = structured[key]
    for key, value in (("seed", config.seed), ("max_fan_in", config.max_fan_in)):
        if value is not None:
            values[key] = value
    if config.mask_gradients:
        values["mask_gradients"] = True
    return Recipe(values)


def _type_name(entry: str) -> str:
    """A module type of the configuration (``type:<qualified name>``) as ``nn.Name``; patterns stay."""
    if not entry.startswith(TYPE_PREFIX):
        return entry
    qualified = entry[len(TYPE_PREFIX) :]
    if qualified.startswith("torch.nn."):
        return "nn." + qualified.rpartition(".")[2]
    raise ValueError(f"include/exclude names the type {qualified}; a recipe can name torch.nn types only")
