"""Trace a model once and record which channels must be removed together.

This module keeps the names other modules import; the tracer itself is split by concern (see
:mod:`prunekit.structure`): :mod:`.labels` (label encoding), :mod:`.ops` (operation names),
:mod:`.calls` (arguments and outputs), :mod:`.tracer` (the torch-function mode),
:mod:`.registry` (rule registries), :mod:`.rules` (built-in rules, one module per family) and
:mod:`.module_rules` (leaf modules traced by a rule).
"""

from __future__ import annotations

from . import rules  # noqa: F401  (registers the built-in rules)
from .calls import bind, is_float_tensor, tensor_leaves
from .labels import NONE, PINNED_LABEL, encode, ids_of, zero_ok_of
from .ops import op_name
from .registry import register_module_rule, register_rule, rule
from .tracer import ChannelTracer, UnsupportedOperationError

__all__ = [
    "NONE",
    "PINNED_LABEL",
    "ChannelTracer",
    "UnsupportedOperationError",
    "bind",
    "encode",
    "ids_of",
    "is_float_tensor",
    "op_name",
    "register_module_rule",
    "register_rule",
    "rule",
    "tensor_leaves",
    "zero_ok_of",
]
