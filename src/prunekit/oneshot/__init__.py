"""Data-aware one-shot pruning of pretrained models (issue 11): calibration, sequential block-by-block
pruning, Wanda, SparseGPT, OWL layer sparsities, and perplexity.

Most users call it through ``pk.prune(model, sparsity=0.5, criterion="wanda", calibration=batches)``;
:func:`prune_with_calibration` is the same entry without the :class:`prunekit.Pruner` around it.
"""

from .api import CalibrationError, OneShotResult, plan_calibrated, prune_with_calibration, run_calibrated
from .owl import owl_sparsities
from .perplexity import perplexity
from .rows import keep_n_of_m, keep_per_row
from .sparsegpt import sparsegpt_prune
from .wanda import Wanda, wanda_keep

__all__ = [
    "CalibrationError",
    "OneShotResult",
    "Wanda",
    "keep_n_of_m",
    "keep_per_row",
    "owl_sparsities",
    "perplexity",
    "plan_calibrated",
    "prune_with_calibration",
    "run_calibrated",
    "sparsegpt_prune",
    "wanda_keep",
]
