"""The registries of tracing rules: by operation and by module type.

An *operation rule* tells the tracer how channels flow through one operation. It is a function
``fn(tracer, func, args, kwargs, out) -> None`` called after ``func(*args, **kwargs)`` ran and
returned ``out``, whenever some input carries channels; it couples ids with the tracer's API
(:meth:`~prunekit.structure.tracer.ChannelTracer.label`, ``consume``, ``param_ids``, ``set_label``,
``graph.join`` / ``graph.pin``; see :mod:`prunekit.structure.tracer`). Rules are registered under
the operation's canonical name (:func:`prunekit.structure.ops.op_name`: ``"add"``, ``"conv2d"``,
``"mylib::my_op"``) or under the function object itself (``torch.ops.mylib.my_op``, a Python
function dispatched through ``__torch_function__``); a rule for the function wins over one for its
name, and a rule registered later for the same key replaces the earlier one (so users override
built-in rules). Example::

    from prunekit.structure import rule

    @rule("my_scaled_add")                       # or @rule(torch.ops.mylib.scaled_add)
    def scaled_add(tracer, func, args, kwargs, out):
        a, b = args[0], args[1]
        tracer.graph.join(ids_of(tracer.full_label(a)), ids_of(tracer.full_label(b)))
        tracer.set_label(out, tracer.label(a))

A *module rule* (:func:`register_module_rule`) makes modules of one type leaves of the trace: the
operations inside their forward are not traced, and the rule says, once the module returned, which
dimensions of its inputs and outputs are which dimensions of its tensors (see
:class:`prunekit.structure.module_rules.ModuleCall`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.layers import ChannelMap, handler_for

Rule = Callable[..., None]
#: What a rule is registered for: a canonical operation name or the function itself.
RuleKey = str | Callable

_BY_NAME: dict[str, Rule] = {}
_BY_FUNCTION: dict[Any, Rule] = {}
_BY_MODULE_TYPE: dict[type, ModuleRule] = {}


@dataclass(frozen=True)
class ModuleRule:
    """A module rule: ``trace(call)`` couples the module's tensors to its inputs and outputs (see
    :class:`prunekit.structure.module_rules.ModuleCall`); ``update_shapes(module)`` (optional) makes the
    module's size attributes agree with its tensors after compaction sliced them."""

    trace: Callable[[Any], None]
    update_shapes: Callable[[Any], None] | None = None


class Registration:
    """What :func:`register_rule` and :func:`register_module_rule` return: ``remove()`` restores the
    rules that were registered under the same keys before."""

    def __init__(self, entries: list[tuple[dict, Any, Any]]):
        self._entries = entries  # (table, key, the rule it replaced or None)

    def remove(self) -> None:
        for table, key, before in reversed(self._entries):
            if before is None:
                table.pop(key, None)
            else:
                table[key] = before
        self._entries = []


def _as_keys(targets: RuleKey | Iterable[RuleKey]) -> list[RuleKey]:
    if isinstance(targets, str) or callable(targets):
        return [targets]
    keys = list(targets)
    if not keys:
        raise ValueError("register_rule needs at least one operation name or function")
    return keys


def register_rule(targets: RuleKey | Iterable[RuleKey], fn: Rule) -> Registration:
    """Register ``fn(tracer, func, args, kwargs, out)`` as the tracing rule of the operations ``targets``
    (canonical names such as ``"add"`` or ``"mylib::op"``, or function objects); replaces any rule
    registered for them before, built-in ones included. Returns a handle whose ``remove()`` undoes it."""
    if not callable(fn):
        raise TypeError(f"a tracing rule must be callable (tracer, func, args, kwargs, out), got {fn!r}")
    keys = _as_keys(targets)
    bad = [key for key in keys if not (isinstance(key, str) or callable(key))]
    if bad:
        raise TypeError(f"a rule is registered for operation names or functions, got {bad[0]!r}")
    entries = []
    for key in keys:
        table = _BY_NAME if isinstance(key, str) else _BY_FUNCTION
        entries.append((table, key, table.get(key)))
        table[key] = fn
    return Registration(entries)


def rule(*targets: RuleKey) -> Callable[[Rule], Rule]:
    """Decorator form of :func:`register_rule`: ``@rule("add", "sub")`` above ``def fn(tracer, func,
    args, kwargs, out)``."""

    def decorate(fn: Rule) -> Rule:
        register_rule(list(targets), fn)
        return fn

    return decorate


def find_rule(func: Callable, name: str) -> Rule | None:
    """The rule for a call: the one registered for ``func`` itself (or its overload packet), else the
    one registered for its canonical name; None when there is none."""
    if _BY_FUNCTION:
        try:
            found = _BY_FUNCTION.get(func)
        except TypeError:  # an unhashable callable
            found = None
        if found is None:
            packet = getattr(func, "overloadpacket", None)
            found = _BY_FUNCTION.get(packet) if packet is not None else None
        if found is not None:
            return found
    return _BY_NAME.get(name)


def rule_for_name(name: str) -> Rule | None:
    """The rule registered under an operation name (for rules that delegate, such as ``max`` between two
    tensors to the elementwise rule)."""
    return _BY_NAME.get(name)


def register_module_rule(
    module_type: type, trace: Callable[[Any], None], *, update_shapes: Callable[[Any], None] | None = None
) -> Registration:
    """Trace modules of ``module_type`` (and its subclasses) as leaves: ``trace(call)`` receives a
    :class:`prunekit.structure.module_rules.ModuleCall` once such a module returned, and says which
    input and output dimensions are which dimensions of the module's tensors; the operations inside its
    forward are not traced. ``update_shapes(module)``, if given, is called by :func:`prunekit.compact`
    after it sliced the module's tensors, to update size attributes (``in_features``, ...). Replaces
    any rule registered for the same type before; returns a handle whose ``remove()`` undoes it."""
    if not isinstance(module_type, type):
        raise TypeError(f"register_module_rule takes a module class, got {module_type!r}")
    if not callable(trace) or (update_shapes is not None and not callable(update_shapes)):
        raise TypeError("register_module_rule: trace (and update_shapes, if given) must be callable")
    previous = _BY_MODULE_TYPE.get(module_type)
    _BY_MODULE_TYPE[module_type] = ModuleRule(trace, update_shapes)
    return Registration([(_BY_MODULE_TYPE, module_type, previous)])


def module_rule(module: Any) -> ModuleRule | None:
    """The module rule for ``module``'s type (the nearest registered class in its MRO), else the one its
    layer handler's :class:`~prunekit.core.layers.ChannelMap` describes, else None."""
    for kind in type(module).__mro__ if _BY_MODULE_TYPE else ():
        found = _BY_MODULE_TYPE.get(kind)
        if found is not None:
            return found
    handler = handler_for(module)
    if handler is None or handler.channels is None:
        return None
    rule = _CHANNEL_MAP_RULES.get(id(handler))
    if rule is None or rule[0] is not handler:
        rule = _CHANNEL_MAP_RULES[id(handler)] = (handler, ModuleRule(_trace_channel_map(handler.channels)))
    return rule[1]


# Built once per handler (kept beside it, so a recycled id never finds another handler's rule).
_CHANNEL_MAP_RULES: dict[int, tuple[Any, ModuleRule]] = {}


def _trace_channel_map(channels: ChannelMap) -> Callable[[Any], None]:
    """A module rule from a layer handler's channel map: the first input's ``input_dim`` is read by the
    ``consumes`` dimensions, the output's ``output_dim`` is made by the ``produces`` ones."""

    def trace(call) -> None:
        present = {n for n, t in (*call.module._parameters.items(), *call.module._buffers.items()) if t is not None}
        x = call.input()
        for name, dim in channels.consumes.items():
            if name in present:
                call.consume(x, channels.input_dim, name, dim)
        produced = [(name, dim) for name, dim in channels.produces.items() if name in present]
        if produced and isinstance(call.output, torch.Tensor):
            (first, first_dim), shared = produced[0], produced[1:]
            call.produce(call.output, channels.output_dim, first, first_dim, shared=shared)

    return trace
