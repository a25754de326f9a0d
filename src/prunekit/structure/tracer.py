"""The channel tracer: a torch-function mode that runs under a model's forward and fills a
:class:`~prunekit.structure.channels.ChannelGraph`.

The model runs eagerly on the example inputs under :class:`ChannelTracer`. Beside every activation
the tracer keeps a label tensor (see :mod:`.labels`); for every call that reads a labelled tensor it
looks up the rule registered for the operation (:mod:`.registry`, built-in rules in :mod:`.rules`) and
lets it couple ids and label the result. Anything without a rule that touches a labelled tensor raises
:class:`UnsupportedOperationError` naming the operation and the module, unless that module is excluded
(then it is a black box whose inputs and outputs keep every channel). Modules with a module rule
(:func:`~prunekit.structure.registry.register_module_rule`) are leaves: their rule runs once they
returned (see :mod:`.module_rules`).

What rules use (the tracer's API): :meth:`ChannelTracer.label` / :meth:`~ChannelTracer.full_label` /
:meth:`~ChannelTracer.set_label` for labels, :meth:`~ChannelTracer.param_ids` for a parameter's
ids, :meth:`~ChannelTracer.consume` and :meth:`~ChannelTracer.produce` for layers,
:meth:`~ChannelTracer.constant_along` for operations that mix positions, and ``graph.join`` /
``graph.pin`` to couple or keep ids.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .calls import is_float_tensor, tensor_leaves
from .channels import ChannelGraph
from .errors import UnsupportedOperationError  # noqa: F401  (raised here; re-exported)
from .labels import NONE, PINNED_LABEL, encode, ids_of, unbroadcast
from .ops import op_name
from .registry import find_rule, module_rule
from .shapes import ACTIVATION_SOURCES, shape_call
from .threads import one_thread

ROOT_FORWARD = "<the model's own forward>"
#: Operations that write into their first argument: the tracer keeps its labels from before the write.
WRITES = frozenset({"setitem", "copy"})


class ChannelTracer(TorchFunctionMode):
    """Runs under a model's forward and fills a :class:`ChannelGraph` (see the module docstring)."""

    def __init__(self, model: nn.Module, excluded: Iterable[nn.Module] = (), shape_only: bool = False):
        super().__init__()
        #: Operations that read a meta tensor return meta tensors, computed by :mod:`.shapes` (the model
        #: runs on meta copies of its float inputs; see :func:`prunekit.structure.forward.run_traced`).
        self.shape_only = shape_only
        self.graph = ChannelGraph()
        self.labels: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.owners: dict[int, tuple[str, str, torch.Tensor]] = {}
        #: (name, module) of every module, shared ones under each name (walked once: models have hundreds).
        self.named_modules = list(model.named_modules(remove_duplicate=False))
        for module_name, module in self.named_modules:
            for kind in (module._parameters, module._buffers):
                for tensor_name, tensor in kind.items():
                    if tensor is not None and id(tensor) not in self.owners:
                        self.owners[id(tensor)] = (module_name, tensor_name, tensor)
        self.excluded = {id(m) for m in excluded}
        self.module_names = {id(m): name for name, m in self.named_modules}
        self._modules = {id(m): m for _, m in self.named_modules}
        self.stack: list[str] = []
        self.opaque_depth = 0
        #: Per-trace memo of rules (f(0) == 0 tests of elementwise functions, ...).
        self.cache: dict[Any, Any] = {}
        # Parameter lookups repeat every time a layer runs: (id, dim, size, producer, consumer) -> ids.
        self._param_ids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        #: (input labels, dim) of every selection by position (x[:, :k], narrow, split with sizes, ...):
        #: a unit that fills only part of that dimension must stay, since the positions are constants.
        self.positional: list[tuple[torch.Tensor, int]] = []
        #: (output labels, outer dims, inner dims) of every reshape that split one dimension in several
        #: (heads from a projection, groups in a channel shuffle), checked once units are known.
        self.splits: list[tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]] = []
        #: Labels of the splits made in a module whose head count compaction cannot update (see
        #: :func:`prunekit.structure.heads.head_count_is_fixed`): the heads in them must stay.
        self.fixed_head_splits: list[torch.Tensor] = []
        #: One id per attention head (per slice of an activation × activation product): the units they
        #: end up in are heads, which ``prune_only="heads"`` / ``"width"`` tell apart from channels.
        self.heads: list[torch.Tensor] = []
        #: Head ids whose output is not zero when the head is pruned but is read only through layer columns
        #: that go with the head (a query head of multi-query attention: its output is the uniform average
        #: of the kept values). :meth:`consume` does not pin them; a unit holding one counts as removed only
        #: once the columns that read it are zero too (:func:`prunekit.structure.units.removed_units`).
        self.read_out_heads: list[torch.Tensor] = []
        #: Tensors that mix every head of an attention module (head-averaged attention weights): reading
        #: them pins those heads (tensor -> head ids).
        self.head_mixtures: WeakIdKeyDictionary = WeakIdKeyDictionary()
        #: The labels of the first argument of a write (``x[i] = y``, ``x.copy_(y)``) from before it ran.
        self.before_write: torch.Tensor | None = None
        #: Modules traced by a module rule (id -> rule).
        self.module_rules = {}
        for module in self._modules.values():
            found = None if id(module) in self.excluded else module_rule(module)
            if found is not None:
                self.module_rules[id(module)] = found
        # Hooks only where they are needed: on excluded and rule-traced modules. A hook on every module would
        # make each module call take torch's slow path; the module an error message names is found from the
        # Python frames instead (see where).
        self._handles = []
        for module in self._modules.values():
            if id(module) in self.excluded or id(module) in self.module_rules:
                self._handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._leave, with_kwargs=True, always_call=True))

    # -------------------------------------------------------------- module bookkeeping

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter(self, module, args, kwargs):
        self.stack.append(self.module_names.get(id(module), "?"))
        if self.opaque_depth == 0 and id(module) in self.excluded:
            self.pin_tensors(*tensor_leaves((args, kwargs)))
        self.opaque_depth += 1

    def _leave(self, module, args, kwargs, output):
        self.stack.pop()
        self.opaque_depth -= 1
        if self.opaque_depth:
            return
        found = self.module_rules.get(id(module))
        if found is not None:
            from .module_rules import ModuleCall  # (module rules build on this module)

            with one_thread():
                ModuleCall(self, module, args, kwargs, output).run(found.trace)
            return
        for tensor in tensor_leaves(output):
            if is_float_tensor(tensor):
                self.labels[tensor] = torch.full(tuple(tensor.shape), PINNED_LABEL, dtype=torch.int64)

    @property
    def where(self) -> str:
        """The name of the innermost module of the model whose code is running (for messages)."""
        module = self.running_module()
        if module is not None:
            return self.module_names[id(module)] or ROOT_FORWARD
        return self.stack[-1] if self.stack and self.stack[-1] else ROOT_FORWARD

    def running_module(self) -> nn.Module | None:
        """The innermost module of the model whose code is running, found from the Python frames (None
        when no module's code is on the stack)."""
        frame = sys._getframe(1)
        while frame is not None:
            module = frame.f_locals.get("self")
            if module is not None and self._modules.get(id(module)) is module:
                return module
            frame = frame.f_back
        return None

    def advice(self, where: str, name: str) -> str:
        """What to do about an operation ``name`` the tracer cannot follow in module ``where``."""
        register = (
            f"register a tracing rule for it (prunekit.structure.register_rule({name!r}, fn), see "
            "prunekit.structure.registry)"
        )
        if where == ROOT_FORWARD:
            # The root cannot be excluded (nothing would be left to prune).
            return (
                f"it runs in the model's own forward, which cannot be excluded: {register}, or move the "
                "operation into a submodule and exclude that submodule (exclude=['its name'])"
            )
        return f"exclude that module (exclude=[{where!r}]) to leave it unpruned, or {register}"

    # -------------------------------------------------------------- labels

    def owner(self, tensor: Any) -> tuple[str, str] | None:
        """(module name, tensor name) of a parameter or buffer of the model; None for anything else."""
        found = self.owners.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return None if found is None or found[2] is not tensor else found[:2]

    def param_ids(self, tensor: torch.Tensor, dim: int, producer: bool = False, consumer: bool = False) -> torch.Tensor:
        """The ids of dimension ``dim`` of a parameter or buffer of the model (allocated on first use);
        ``producer``: this dimension creates channels (a layer's outputs), ``consumer``: it reads them."""
        key = (id(tensor), dim, tensor.shape[dim], producer, consumer)
        found = self._param_ids.get(key)
        if found is not None and found[0] is tensor:  # the same call again: nothing new to record
            return found[1]
        owner, name = self.owner(tensor)
        ids = self.graph.ids(owner, name, dim % tensor.ndim, tensor.shape[dim], producer, consumer)
        self._param_ids[key] = (tensor, ids)
        return ids

    def label(self, tensor: Any) -> torch.Tensor | None:
        """The label tensor of an activation or parameter (None for plain data)."""
        if not isinstance(tensor, torch.Tensor):
            return None
        found = self.labels.get(tensor)
        if found is not None:
            return found
        dim = self._parameter_channel_dim(tensor)
        if dim is None:
            return None
        ids = self.param_ids(tensor, dim)
        shape = [1] * tensor.ndim
        shape[dim] = -1
        return encode(ids, True).reshape(shape).expand(tuple(tensor.shape))

    def _parameter_channel_dim(self, tensor: torch.Tensor) -> int | None:
        """A parameter used outside a layer (a position embedding, a layer scale, a bias table): its channels
        are its last dimension longer than 1 (None for anything else)."""
        if self.owner(tensor) is None or not isinstance(tensor, nn.Parameter):
            return None
        dims = [d for d in range(tensor.ndim) if tensor.shape[d] > 1]
        return dims[-1] if dims else None

    def has_label(self, tensor: Any) -> bool:
        """``self.label(tensor) is not None`` (with the same ids allocated), without building the label."""
        if not isinstance(tensor, torch.Tensor):
            return False
        if self.labels.get(tensor) is not None:
            return True
        dim = self._parameter_channel_dim(tensor)
        if dim is None:
            return False
        self.param_ids(tensor, dim)
        return True

    def full_label(self, tensor: torch.Tensor) -> torch.Tensor:
        """:meth:`label`, with plain data as a tensor of :data:`NONE`."""
        found = self.label(tensor)
        return torch.full(tuple(tensor.shape), NONE, dtype=torch.int64) if found is None else found

    def set_label(self, tensor: Any, label: torch.Tensor | None, has_channels: bool = False) -> None:
        """Record ``tensor``'s labels (forgotten when None or all plain data); ``has_channels`` says the
        caller knows some entry holds a channel (saves the test)."""
        if not is_float_tensor(tensor):
            return
        if label is None or not ((has_channels and label.numel()) or bool((unbroadcast(label) >= 0).any())):
            self.labels.pop(tensor, None)
            return
        if tuple(label.shape) != tuple(tensor.shape):
            label = label.expand(tuple(tensor.shape))
        self.labels[tensor] = label

    def pin_tensors(self, *tensors: Any) -> None:
        """Keep every channel these tensors carry (a computed weight, an opaque input)."""
        for tensor in tensors:
            label = self.label(tensor)
            if label is not None:
                self.graph.pin(ids_of(label))

    def pin_outputs(self, out: Any) -> None:
        """Label every float tensor of ``out`` with the pinned channel: kept whole, whatever reads it."""
        for tensor in tensor_leaves(out):
            if is_float_tensor(tensor):
                self.set_label(tensor, torch.full(tuple(tensor.shape), PINNED_LABEL, dtype=torch.int64))

    # -------------------------------------------------------------- layers

    def constant_along(self, label: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """Labels constant along ``dims`` (kept with size 1 there); channels that vary along them are mixed
        by the operation, so they are pinned and their positions become plain data."""
        if not dims:
            return label
        full = [1 if d in dims else size for d, size in enumerate(label.shape)]
        label = unbroadcast(label)  # a broadcast dimension is constant by construction
        if all(label.shape[d] == 1 for d in dims):  # the usual case: a layer's output, broadcast over pixels
            return label.expand(full)
        low = label.amin(dim=dims, keepdim=True)
        high = label.amax(dim=dims, keepdim=True)
        constant = low == high
        if not bool(constant.all()):
            mixed = label[~constant.expand(label.shape)]
            self.graph.pin(ids_of(mixed))
        return torch.where(constant, low, torch.full_like(low, NONE)).expand(full)

    def consume(self, label: torch.Tensor | None, dim: int, ids: torch.Tensor | None) -> None:
        """A layer contracts ``dim`` of its input against ``ids`` (its own input-channel ids): the channel
        found at index i is joined to ``ids[i]``; with ``ids`` None the channels are pinned (the layer
        cannot shrink along that dimension)."""
        if label is None:
            return
        dim = dim % label.ndim
        per_index = self.constant_along(label, tuple(d for d in range(label.ndim) if d != dim)).reshape(-1)
        channel = ids_of(per_index)
        if self.read_out_heads:  # their columns here go with them: exact without a zero input
            read_out = torch.isin(ids_of(per_index), torch.cat(self.read_out_heads))
            per_index = torch.where(read_out, per_index | 1, per_index)
        # A channel that is not zero where it is pruned changes the layer's output: it must stay.
        self.graph.pin_labels(per_index)
        if ids is None:
            self.graph.pin(channel)
        else:
            self.graph.join(channel, ids)

    def produce(self, shape: tuple[int, ...], dim: int, ids: torch.Tensor, zero_ok: bool = True) -> torch.Tensor:
        """The labels of a layer output of ``shape`` whose dimension ``dim`` holds the channels ``ids``."""
        view = [1] * len(shape)
        view[dim % len(shape)] = -1
        return encode(ids, zero_ok).reshape(view).expand(shape)

    def join_param(self, tensor: Any, dim: int, ids: torch.Tensor) -> bool:
        """Join a layer's bias or norm parameter (or buffer) to the channel ids; False when absent."""
        if tensor is None or self.owner(tensor) is None:
            return False
        self.graph.join(self.param_ids(tensor, dim), ids)
        return True

    # -------------------------------------------------------------- dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        inputs = tensor_leaves((args, kwargs))
        run = func
        if self.shape_only and (name in ACTIVATION_SOURCES or any(t.device.type == "meta" for t in inputs)):
            run = partial(shape_call, func, name)
        if name in WRITES:
            return self._write_call(name, func, run, args, kwargs)
        out = run(*args, **kwargs)
        if self.opaque_depth:
            return out
        # has_label on every input, not just up to the first labelled one: it gives a parameter its ids
        # as label() would, so ids are allocated in the same order whatever the call returns.
        if not any([self.has_label(t) for t in inputs]):
            return out
        if not any(is_float_tensor(t) for t in tensor_leaves(out)):
            return out
        self._apply_rule(name, func, args, kwargs, out)
        return out

    def _write_call(self, name, func, run, args, kwargs):
        """``x[i] = y`` and ``x.copy_(y)``: the labels of ``x`` before the write are needed after it."""
        before = None if self.opaque_depth else self.full_label(args[0]).clone()
        out = run(*args, **kwargs)
        if self.opaque_depth:
            return out
        if any([self.has_label(t) for t in tensor_leaves((args, kwargs))]):
            self.before_write = before
            try:
                self._apply_rule(name, func, args, kwargs, out)
            finally:
                self.before_write = None
        else:
            self.set_label(args[0], None)
        return out

    def _apply_rule(self, name, func, args, kwargs, out) -> None:
        if len(self.head_mixtures):
            for tensor in tensor_leaves((args, kwargs)):
                heads = self.head_mixtures.get(tensor)
                if heads is not None:
                    self.graph.pin(heads)
        found = find_rule(func, name)
        if found is None:
            where = self.where
            raise UnsupportedOperationError(
                f"prunekit cannot follow channels through the operation {name!r} in module {where!r}; "
                f"{self.advice(where, name)}, or report the operation"
            )
        try:
            with one_thread():
                found(self, func, args, kwargs, out)
        except UnsupportedOperationError:
            raise
        except Exception as error:  # a rule failed on an unexpected call form: say where, never guess
            where = self.where
            raise UnsupportedOperationError(
                f"prunekit cannot follow channels through {name!r} in module {where!r} "
                f"({type(error).__name__}: {error}); {self.advice(where, name)}, or report the operation"
            ) from error
