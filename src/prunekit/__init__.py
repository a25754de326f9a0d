"""prunekit: make PyTorch models smaller and faster by pruning.

Every pruning method is a choice along four axes, composed by :class:`Pruner`:

- granularity (:mod:`prunekit.granularity`): which weights go together;
- criterion (:mod:`prunekit.criteria`): how they are scored;
- scope (``"local"`` / ``"global"``, :mod:`prunekit.selection`): where scores are compared;
- schedule (:mod:`prunekit.schedules`): when, and how much.

Quick start::

    import prunekit as pk
    pk.prune(model, sparsity=0.9, criterion="magnitude", granularity="weight", scope="global")
    print(pk.summary(model))
"""

from . import bench, data, fhe, oneshot
from .compact import CompactionError, apply_plan, compact, load_pruned, save_pruned
from .criteria import Criterion, Custom, Gradient, L2Magnitude, Magnitude, Movement, Random
from .granularity import NM, Block, Granularity
from .hf import from_pretrained
from .masks import masked_parameters
from .oneshot import perplexity
from .pruner import Pruner, prune
from .schedules import Gradual, Iterative, OneShot, Schedule, epochs_to_steps
from .structure import ChannelDependencies, UnsupportedOperationError, trace_dependencies
from .summary import LayerStats, Summary, summary

__version__ = "0.1.0"

__all__ = [
    "Block",
    "ChannelDependencies",
    "CompactionError",
    "UnsupportedOperationError",
    "apply_plan",
    "compact",
    "load_pruned",
    "save_pruned",
    "trace_dependencies",
    "Criterion",
    "Custom",
    "Gradient",
    "Gradual",
    "Granularity",
    "Iterative",
    "L2Magnitude",
    "LayerStats",
    "Magnitude",
    "Movement",
    "NM",
    "OneShot",
    "Pruner",
    "Random",
    "Schedule",
    "Summary",
    "bench",
    "data",
    "epochs_to_steps",
    "fhe",
    "from_pretrained",
    "masked_parameters",
    "oneshot",
    "perplexity",
    "prune",
    "summary",
]
