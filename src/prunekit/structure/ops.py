"""Operation names: one canonical name per function the tracer sees, under which rules are registered.

``x += y``, ``x.add_(y)``, ``torch.add`` and ``Tensor.add`` are all ``add``; reflected operators map to
the operation they compute (``2 - x`` is ``rsub``); in-place variants lose their trailing underscore;
properties read through ``Tensor`` (``x.T``, ``x.data``) are ``property:T``, ``property:data``; torch
operator overloads (``torch.ops.mylib.op.default``) are named ``mylib::op``.
"""

from __future__ import annotations

from collections.abc import Callable

_DUNDER_ALIASES = {"truediv": "div", "floordiv": "floor_divide", "mod": "remainder", "and": "logical", "or": "logical",
                   "xor": "logical", "lshift": "logical", "rshift": "logical", "invert": "logical"}  # fmt: skip
_REVERSED = {"radd": "add", "rmul": "mul", "rsub": "rsub", "rtruediv": "rtruediv", "rdiv": "rtruediv",
             "rpow": "rpow", "rmatmul": "rmatmul", "rfloordiv": "rtruediv"}  # fmt: skip
_IN_PLACE_OPERATORS = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul"}


def op_name(func: Callable) -> str:
    """A canonical name: ``x += y`` and ``torch.add`` are both ``add``, ``x.T`` is ``property:T``."""
    try:
        return _OP_NAMES[func]
    except KeyError:
        name = _OP_NAMES[func] = _op_name(func)
    except TypeError:  # an unhashable callable
        name = _op_name(func)
    return name


# The tracer asks for the name of every call it sees; the same few functions come back every time.
_OP_NAMES: dict[Callable, str] = {}


def _op_name(func: Callable) -> str:
    schema = getattr(func, "_schema", None)  # a torch.ops OpOverload (custom ops included)
    if schema is not None and hasattr(func, "overloadpacket"):
        return str(schema.name)
    qualified = getattr(func, "_qualified_op_name", None)  # an OpOverloadPacket
    if isinstance(qualified, str):
        return qualified
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":
        return "property:" + getattr(getattr(func, "__self__", None), "__name__", "?")
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core in _REVERSED:
            return _REVERSED[core]
        if core.startswith("i") and core[1:] in _IN_PLACE_OPERATORS:
            core = core[1:]
        return _DUNDER_ALIASES.get(core, core)
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name
