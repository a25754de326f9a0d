"""Calling a model on example inputs given in any of the forms prunekit accepts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Run ``model`` on example inputs given as a tensor, a tuple/list of positional inputs, or a dict of
    keyword inputs (as Hugging Face models take them)."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)
