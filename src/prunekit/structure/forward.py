"""Running a model under the channel tracer: on the shapes of its inputs first, for real when it must.

The tracer needs shapes, dtypes and which tensor flows where, never values, so :func:`run_traced`
first runs the model on meta copies of its floating-point inputs (:func:`shapes_only`), each operation
returning a meta tensor computed by :mod:`.shapes`: no convolution or matrix product is computed. A
forward that reads values (``if x.sum() > 0``, ``x.item()``, ``torch.nonzero``) or anything else that
fails that way is run again for real, so the result never depends on which run made it (tests compare
both on every model family).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..core.inputs import call_model
from .calls import tensor_leaves
from .labels import ids_of
from .tracer import ChannelTracer


def run_traced(
    model: nn.Module, example_inputs: Any, excluded: list[nn.Module], prune_outputs: bool, shape_only: bool = True
) -> tuple[ChannelTracer, Any]:
    """The tracer that ran under ``model``'s forward on ``example_inputs`` (eval mode, no gradients; the
    train/eval flags restored; the outputs' channels pinned unless ``prune_outputs``), and the model's
    output when it was computed for real (None after a shape-only run). ``shape_only=False`` skips the
    shape-only attempt."""
    shape_inputs = shapes_only(example_inputs) if shape_only else None
    if shape_inputs is not None:
        try:
            tracer, output = _run_once(model, shape_inputs, excluded, prune_outputs, shape_only=True)
        except Exception:  # the forward reads values (or fails anyhow): the real run says what it needs
            pass
        else:
            if any(t.device.type == "meta" for t in tensor_leaves(output)):
                output = None  # no values (a compaction check runs the model itself)
            return tracer, output
    return _run_once(model, example_inputs, excluded, prune_outputs, shape_only=False)


def _run_once(
    model: nn.Module, example_inputs: Any, excluded: list[nn.Module], prune_outputs: bool, shape_only: bool
) -> tuple[ChannelTracer, Any]:
    """Run ``model`` on ``example_inputs`` under a new tracer (eval mode, no gradients; the train/eval
    flags restored) and pin what the outputs carry; returns the tracer and the model's output."""
    flags = {module: module.training for module in model.modules()}
    tracer = ChannelTracer(model, excluded, shape_only=shape_only)
    try:
        if any(flags.values()):  # eval() walks every module: skipped when there is nothing to switch
            model.eval()
        with torch.no_grad(), tracer:
            output = call_model(model, example_inputs)
        for tensor in tensor_leaves(output):
            label = tracer.label(tensor)
            if label is not None and not prune_outputs:
                tracer.graph.pin(ids_of(label))
            heads = tracer.head_mixtures.get(tensor)
            if heads is not None:  # weights averaged over heads change with any head, whatever prune_outputs says
                tracer.graph.pin(heads)
    finally:
        tracer.close()
        for module, training in flags.items():
            if module.training != training:
                module.training = training
    return tracer, output


def shapes_only(example_inputs: Any) -> Any:
    """The example inputs with every floating-point tensor replaced by a meta tensor of its shape and
    dtype (integer ids and masks stay as they are), for a trace that computes nothing (see
    :mod:`.shapes`); None where a float input is on an accelerator, whose code paths (kernels chosen by
    device) a meta run would not follow."""
    leaves = [leaf for leaf in pytree.tree_leaves(example_inputs) if isinstance(leaf, torch.Tensor)]
    if any(leaf.is_floating_point() and leaf.device.type not in ("cpu", "meta") for leaf in leaves):
        return None

    def shape_of(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type != "meta":
            return torch.empty(value.shape, dtype=value.dtype, device="meta")
        return value

    return pytree.tree_map(shape_of, example_inputs)
