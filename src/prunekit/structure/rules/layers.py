"""Rules for layers with weights: linear, convolutions, transposed convolutions, batch / instance /
layer / RMS / group norm and embedding.

A layer *consumes* the channels of its input dimension (joining them to its weight's input ids) and
*produces* new channels from its weight's output ids; biases and norm parameters (and running
statistics) are joined to the channels they belong to. A weight that is not a parameter of the model
(computed by a hypernetwork or weight norm) makes the layer opaque: its channels stay.
"""

from __future__ import annotations

import torch

from ..calls import bind
from ..labels import NONE, PINNED_LABEL, encode, ids_of, zero_ok_of
from ..registry import register_rule


def linear(tracer, func, args, kwargs, out) -> None:
    """``F.linear(x, W, b)``: x's last dimension is consumed by W's columns, W's rows produce the output."""
    x, weight, bias = bind(args, kwargs, ("input", "weight", "bias"))
    if tracer.owner(weight) is None:  # a computed weight (hypernetwork, weight norm): channels stay
        tracer.pin_tensors(x, weight, bias)
        tracer.set_label(out, None)
        return
    tracer.consume(tracer.label(x), -1, tracer.param_ids(weight, 1, consumer=True))
    out_ids = tracer.param_ids(weight, 0, producer=True)
    tracer.join_param(bias, 0, out_ids)
    tracer.set_label(out, tracer.produce(tuple(out.shape), -1, out_ids), has_channels=True)


def conv(tracer, func, args, kwargs, out) -> None:
    """``F.conv{1,2,3}d``; a grouped conv loses whole groups (input channels and filters together)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    x, weight, bias, _, _, _, groups = bind(args, kwargs, names)
    groups = 1 if groups is None else int(groups)
    if tracer.owner(weight) is None:
        tracer.pin_tensors(x, weight, bias)
        tracer.set_label(out, None)
        return
    channel_dim = 1 if x.ndim == weight.ndim else 0
    out_ids = tracer.param_ids(weight, 0, producer=True)
    if groups == 1:
        tracer.consume(tracer.label(x), channel_dim, tracer.param_ids(weight, 1, consumer=True))
    else:
        # Grouped and depthwise convs: a whole group (its input channels and its filters) is one unit,
        # so every remaining group keeps its size and the conv stays a valid grouped conv.
        per_group_in, per_group_out = x.shape[channel_dim] // groups, weight.shape[0] // groups
        group_of_out = out_ids.reshape(groups, per_group_out)
        for column in range(1, per_group_out):
            tracer.graph.join(group_of_out[:, 0], group_of_out[:, column])
        per_input = group_of_out[:, 0].repeat_interleave(per_group_in)
        label = tracer.full_label(x)
        tracer.consume(label, channel_dim, per_input)
        # A group whose input channels cannot go (model inputs, plain data) cannot go either.
        channel = ids_of(label.movedim(channel_dim, 0).reshape(label.shape[channel_dim], -1).amax(dim=1))
        tracer.graph.pin(per_input[channel < 0])
    tracer.join_param(bias, 0, out_ids)
    tracer.set_label(out, tracer.produce(tuple(out.shape), channel_dim, out_ids), has_channels=True)


def conv_transpose(tracer, func, args, kwargs, out) -> None:
    """``F.conv_transpose{1,2,3}d``: the weight is stored (in, out, ...); grouped ones stay whole."""
    x, weight, bias = bind(args, kwargs, ("input", "weight", "bias"))
    groups = kwargs.get("groups", args[6] if len(args) > 6 else 1)
    if tracer.owner(weight) is None or groups != 1:
        tracer.pin_tensors(x, weight, bias)
        tracer.consume(tracer.label(x), 1 if x.ndim == weight.ndim else 0, None)
        tracer.set_label(out, None)
        return
    channel_dim = 1 if x.ndim == weight.ndim else 0
    tracer.consume(tracer.label(x), channel_dim, tracer.param_ids(weight, 0, consumer=True))
    out_ids = tracer.param_ids(weight, 1, producer=True)
    tracer.join_param(bias, 0, out_ids)
    tracer.set_label(out, tracer.produce(tuple(out.shape), channel_dim, out_ids), has_channels=True)


def batch_norm(tracer, func, args, kwargs, out) -> None:
    """Batch and instance norm work per channel: their parameters and statistics go with it."""
    x, mean, var, weight, bias = bind(args, kwargs, ("input", "running_mean", "running_var", "weight", "bias"))
    channel_dim = 1 if x.ndim > 1 else 0
    others = tuple(d for d in range(x.ndim) if d != channel_dim)
    ids = ids_of(tracer.constant_along(tracer.full_label(x), others).reshape(-1))
    affine = all([tracer.join_param(t, 0, ids) for t in (weight, bias)])
    for buffer in (mean, var):
        tracer.join_param(buffer, 0, ids)
    # A pruned channel leaves the norm as exact zeros only when its weight and bias are masked with it
    # (then (x − μ)/σ · 0 + 0 = 0 in training and in eval mode alike).
    tracer.set_label(out, tracer.produce(tuple(out.shape), channel_dim, ids, zero_ok=affine))


def layer_norm(tracer, func, args, kwargs, out) -> None:
    """Layer and RMS norm: statistics over the normalised dimensions mix every channel in them, so those
    channels must stay (removing one changes the mean and variance of all the others)."""
    x, shape, weight, bias = bind(args, kwargs, ("input", "normalized_shape", "weight", "bias"))
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dims = tuple(range(x.ndim - len(shape), x.ndim))
    label = tracer.full_label(x)
    tracer.constant_along(label, dims)
    for tensor in (weight, bias):
        if tensor is not None and tracer.owner(tensor) is not None:
            for d in range(tensor.ndim):
                if tensor.shape[d] > 1:
                    tracer.graph.pin(tracer.param_ids(tensor, d))
    tracer.set_label(out, torch.where(label >= 0, PINNED_LABEL, NONE).expand(tuple(out.shape)))


def group_norm(tracer, func, args, kwargs, out) -> None:
    """Group norm: a group's statistics mix its channels, so only whole groups can go (num_groups shrinks)."""
    x, num_groups, weight, bias = bind(args, kwargs, ("input", "num_groups", "weight", "bias"))
    others = tuple(d for d in range(x.ndim) if d != 1)
    per_channel = tracer.constant_along(tracer.full_label(x), others).reshape(-1)
    ids = ids_of(per_channel).reshape(num_groups, -1)
    for column in range(1, ids.shape[1]):
        tracer.graph.join(ids[:, 0], ids[:, column])
    ids = ids.reshape(-1)
    affine = [tracer.join_param(t, 0, ids) for t in (weight, bias)]
    zero_ok = zero_ok_of(per_channel) & all(affine)
    tracer.set_label(out, encode(ids, zero_ok).reshape([-1 if d == 1 else 1 for d in range(x.ndim)]))


def embedding(tracer, func, args, kwargs, out) -> None:
    """``F.embedding(indices, W)``: W's columns produce the output's channels."""
    _, weight = bind(args, kwargs, ("input", "weight"))
    if tracer.owner(weight) is None:
        tracer.pin_tensors(weight)
        tracer.set_label(out, None)
        return
    tracer.set_label(out, tracer.produce(tuple(out.shape), -1, tracer.param_ids(weight, 1, producer=True)))


register_rule("linear", linear)
register_rule(["conv1d", "conv2d", "conv3d"], conv)
register_rule(["conv_transpose1d", "conv_transpose2d", "conv_transpose3d"], conv_transpose)
register_rule(["batch_norm", "instance_norm"], batch_norm)
register_rule(["layer_norm", "rms_norm"], layer_norm)
register_rule("group_norm", group_norm)
register_rule("embedding", embedding)
