"""Structural dependencies: which channels, neurons and heads must be removed together.

Layout (one concern per file):

- :mod:`.channels`: channel ids and the coupling graph (joins, pins, connected components);
- :mod:`.labels`: label tensors (``2·id + z`` per element) and their helpers;
- :mod:`.ops`: canonical operation names (``x += y`` and ``torch.add`` are both ``"add"``);
- :mod:`.calls`: tensors in nested arguments/outputs, arguments by name;
- :mod:`.tracer`: :class:`~.tracer.ChannelTracer`, the torch-function mode: dispatch, labels, module
  enter/leave, and the API rules use (``label``, ``set_label``, ``param_ids``, ``consume``, ``produce``);
- :mod:`.registry`: rule registries by operation (:func:`register_rule`, :func:`rule`) and by module
  type (:func:`register_module_rule`);
- :mod:`.rules`: the built-in rules, one file per family (elementwise, reductions, movement, layers,
  attention);
- :mod:`.module_rules`: :class:`~.module_rules.ModuleCall`, what a module rule receives;
- :mod:`.shapes`: output rules for shape-only tracing (what an operation returns, without computing it);
  :mod:`.forward`: running the model under the tracer, on meta copies of its float inputs first;
- :mod:`.products`: which calls multiply two activations (shared with :func:`prunekit.summary`);
- :mod:`.dependencies`: the resulting units of structured pruning (:func:`trace_dependencies`);
- :mod:`.units`: scoring and choosing units; :mod:`.cost`: parameters and MACs they cost;
- :mod:`.trace`: the names other modules import, re-exported.

To support an operation, register a rule ``fn(tracer, func, args, kwargs, out)`` for its name (as
:func:`~.ops.op_name` gives it) or its function: ``@rule("my_op")`` or ``register_rule(torch.ops.lib.op,
fn)``; a rule registered later replaces an earlier one, built-in ones included. To trace a layer type as
a leaf (a quantized Linear whose forward computes its weight), ``register_module_rule(LayerType, fn)``
with ``fn(call)`` declaring ``call.consume(...)`` / ``call.produce(...)`` (see :mod:`.module_rules`).
An operation whose meta kernel is slow (a Python decomposition) can get an output rule for shape-only
tracing: ``register_shape_rule("my_op", fn)`` with ``fn(args, kwargs)`` returning a meta tensor.
"""

from . import rules  # noqa: F401  (registers the built-in rules)
from .dependencies import ChannelDependencies, trace_dependencies
from .module_rules import ModuleCall
from .registry import register_module_rule, register_rule, rule
from .shapes import register_shape_rule
from .tracer import ChannelTracer, UnsupportedOperationError

__all__ = [
    "ChannelDependencies",
    "ChannelTracer",
    "ModuleCall",
    "UnsupportedOperationError",
    "register_module_rule",
    "register_rule",
    "register_shape_rule",
    "rule",
    "trace_dependencies",
]
