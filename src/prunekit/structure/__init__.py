"""Structural dependencies: which channels, neurons and heads must be removed together.

- :mod:`.channels`: channel ids and the coupling graph;
- :mod:`.trace`: runs the model once and records couplings operation by operation;
- :mod:`.dependencies`: the resulting units of structured pruning (:func:`trace_dependencies`);
- :mod:`.units`: scoring and choosing units.
"""

from .dependencies import ChannelDependencies, trace_dependencies
from .trace import UnsupportedOperationError

__all__ = ["ChannelDependencies", "UnsupportedOperationError", "trace_dependencies"]
