"""prunekit: make PyTorch models smaller and faster by pruning.

Every pruning method is a choice along four axes, composed by :class:`Pruner`:

- granularity (:mod:`prunekit.methods.granularity`): which weights go together;
- criterion (:mod:`prunekit.methods.criteria`): how they are scored;
- scope (``"local"`` / ``"global"`` / ``"row"``, :mod:`prunekit.engines`): where scores are compared;
- schedule (:mod:`prunekit.methods.schedules`): when, and how much.

Quick start::

    import prunekit as pk
    pk.prune(model, sparsity=0.9, criterion="magnitude", granularity="weight", scope="global")
    print(pk.summary(model))

The package is layered (see ARCHITECTURE.md): ``core`` → ``methods`` → ``structure`` → ``engines`` →
``pruner`` → compaction, reporting and integrations → ``cli``. ``prunekit.bench`` (the benchmark
harness) and ``prunekit.data`` (dataset readers) load on first use.
"""

import importlib

from . import attention as _attention  # noqa: F401  registers nn.MultiheadAttention's compaction
from . import compressed, fhe, hf, oneshot, sparse
from .api import prune
from .compact import CompactionError, compact
from .compare import Comparison, compare
from .compressed import CompressedFileError, inspect_file, share_weights
from .core.config import PruningConfig, StructuredOptions
from .core.layers import ChannelMap, LayerHandler, register_layer, unregister_layer
from .core.masks import masked_parameters
from .export import OnnxExport, export_onnx
from .hf import from_pretrained
from .methods.constraints import Constraint, ConstraintContext, keep_best_per_row
from .methods.criteria import (
    Criterion,
    Custom,
    Gradient,
    L2Magnitude,
    Magnitude,
    Movement,
    Random,
    register_criterion,
)
from .methods.granularity import NM, Block, Granularity, register_granularity
from .methods.schedules import Gradual, Iterative, OneShot, Schedule, epochs_to_steps
from .oneshot import OWL, perplexity
from .plans import apply_plan
from .pruner import Pruner
from .recipes import Recipe, RecipeError, load_recipe
from .saving import load_pruned, save_pruned
from .sensitivity import Sensitivity, sensitivity
from .sparse import to_dense, to_sparse
from .structure import ChannelDependencies, UnsupportedOperationError, trace_dependencies
from .summary import LayerStats, Summary, summary

__version__ = "0.1.0"

_LAZY = ("bench", "data")


def __getattr__(name: str):
    # The benchmark harness and the dataset readers are not needed to prune; load them on first use.
    if name in _LAZY:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")


__all__ = [
    "Block",
    "ChannelDependencies",
    "ChannelMap",
    "CompactionError",
    "Comparison",
    "Constraint",
    "ConstraintContext",
    "CompressedFileError",
    "Criterion",
    "Custom",
    "Gradient",
    "Gradual",
    "Granularity",
    "Iterative",
    "L2Magnitude",
    "LayerHandler",
    "LayerStats",
    "Magnitude",
    "Movement",
    "NM",
    "OWL",
    "OneShot",
    "Pruner",
    "PruningConfig",
    "Random",
    "Recipe",
    "RecipeError",
    "Schedule",
    "Sensitivity",
    "StructuredOptions",
    "Summary",
    "UnsupportedOperationError",
    "apply_plan",
    "bench",
    "compact",
    "compare",
    "compressed",
    "data",
    "epochs_to_steps",
    "export_onnx",
    "OnnxExport",
    "fhe",
    "from_pretrained",
    "hf",
    "inspect_file",
    "keep_best_per_row",
    "load_recipe",
    "load_pruned",
    "masked_parameters",
    "oneshot",
    "perplexity",
    "prune",
    "register_criterion",
    "register_granularity",
    "register_layer",
    "save_pruned",
    "sensitivity",
    "share_weights",
    "sparse",
    "summary",
    "to_dense",
    "to_sparse",
    "trace_dependencies",
    "unregister_layer",
]
