"""Reading the calls the tracer sees: tensors in nested arguments and outputs, arguments by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree


def is_float_tensor(value: Any) -> bool:
    """A floating-point or complex tensor: the values channels flow through (indices and masks do not)."""
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    """Every tensor in a nested structure of outputs or arguments (Hugging Face ModelOutput included)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if hasattr(tree, "to_tuple") and callable(tree.to_tuple):  # Hugging Face ModelOutput
        tree = tree.to_tuple()
    found: list[torch.Tensor] = []
    _collect_tensors(tree, found)
    return found


# Values that hold no tensor: an operation's arguments are mostly these, and telling them apart here
# is much cheaper than a pytree traversal.
_PLAIN = (int, float, bool, complex, str, bytes, type(None), type(Ellipsis), slice, torch.Size, torch.dtype,
          torch.device, torch.layout, torch.memory_format)  # fmt: skip


def _collect_tensors(tree: Any, found: list[torch.Tensor]) -> None:
    """The tensors of ``pytree.tree_leaves(tree)``, in that order: plain lists, tuples and dicts are walked
    here, anything else pytree knows (named tuples, ordered dicts, registered classes) goes to pytree."""
    kind = type(tree)
    if kind is tuple or kind is list:
        for item in tree:
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif not isinstance(item, _PLAIN):
                _collect_tensors(item, found)
    elif kind is dict:
        _collect_tensors(list(tree.values()), found)
    elif isinstance(tree, torch.Tensor):
        found.append(tree)
    elif not isinstance(tree, _PLAIN):
        found.extend(leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor))


def first_given(kwargs: dict, *names: str) -> Any:
    """The first of several alternative keyword arguments that was given (None if none was)."""
    return next((kwargs[name] for name in names if name in kwargs), None)


_SIGNATURES: dict[Callable, inspect.Signature] = {}


def signature(func: Callable) -> inspect.Signature:
    """A Python function's signature, cached (rules that bind many arguments by name use it)."""
    found = _SIGNATURES.get(func)
    if found is None:
        found = _SIGNATURES[func] = inspect.signature(func)
    return found


def bind(args: tuple, kwargs: dict, names: tuple[str, ...]) -> list[Any]:
    """Positional-or-keyword arguments by name (None where absent)."""
    return [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)]
