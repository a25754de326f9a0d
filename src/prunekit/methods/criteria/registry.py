"""The criteria registry: names → criterion classes (``criterion="magnitude"``), and building a criterion
from a name, an instance or a function with the pruner's options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import OPTIONS, Criterion
from .custom import Custom

CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(name: str, cls: type[Criterion] | None = None):
    """Register a :class:`Criterion` subclass under ``name`` (``criterion="name"``). Use it as a call,
    ``register_criterion("mine", Mine)``, or as a class decorator, ``@register_criterion("mine")``.
    Registering a name again replaces the earlier class."""

    def add(criterion_class: type[Criterion]) -> type[Criterion]:
        if not (isinstance(criterion_class, type) and issubclass(criterion_class, Criterion)):
            raise TypeError(f"register_criterion takes a pk.Criterion subclass, got {criterion_class!r}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"a criterion is registered under a non-empty name, got {name!r}")
        CRITERIA[name] = criterion_class
        return criterion_class

    return add if cls is None else add(cls)


def get_criterion(spec: str | Criterion | Callable, **options: Any) -> Criterion:
    """Build a criterion from a registered name, an instance or a callable ``fn(weight, module)``.

    ``options`` are the pruner's ``data``, ``loss_fn`` and ``seed`` (None: not given); one that the
    criterion does not take raises ``ValueError`` naming it.
    """
    given = {key: value for key, value in options.items() if value is not None}
    unknown = set(given) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown criterion options {sorted(unknown)}; valid ones are {list(OPTIONS)}")
    if isinstance(spec, Criterion):
        cls, instance = type(spec), spec
    elif isinstance(spec, str):
        cls = CRITERIA.get(spec)
        if cls is None:
            valid = ", ".join(repr(name) for name in CRITERIA)
            raise ValueError(
                f"unknown criterion {spec!r}; valid names are {valid}, or pass a function fn(weight, module) "
                "or register your own with pk.register_criterion"
            )
        instance = None
    elif callable(spec):
        cls, instance = Custom, None
    else:
        raise TypeError(f"criterion must be a name, a prunekit Criterion or a function, got {spec!r}")
    unused = [key for key in given if key not in cls.options or instance is not None]
    if unused:
        takers = sorted({name for name, c in CRITERIA.items() if set(unused) <= set(c.options)})
        where = f"; criteria that take them: {takers}" if takers else ""
        shown = spec if isinstance(spec, str) else getattr(instance, "name", cls.__name__)
        raise ValueError(
            f"criterion {shown!r} does not use {', '.join(f'{key}=' for key in unused)}: drop "
            f"{'it' if len(unused) == 1 else 'them'}{where}"
        )
    if instance is not None:
        return instance
    if cls is Custom:
        return cls(spec)
    return cls(**{key: given[key] for key in cls.options if key in given})
