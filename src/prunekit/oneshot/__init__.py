"""Data-aware one-shot pruning of pretrained models (issue 11), from calibration batches.

- unstructured and N:M: calibration, sequential block-by-block pruning (:mod:`.api`, :mod:`.blocks`,
  :mod:`.calibration`, :mod:`.offload`), Wanda (:mod:`.wanda`), SparseGPT (:mod:`.sparsegpt`), OWL layer
  sparsities (:mod:`.owl`), per-row selection (:mod:`.rows`), and perplexity (:mod:`.perplexity`);
- structured: heads, neurons and channels scored from activations (Wanda-style groups, FLAP's
  fluctuation, :mod:`.structured`, :mod:`.activations`), with the least-squares refit of the layers that
  read them and bias compensation (:mod:`.reconstruct`).

Most users call it through ``pk.prune(model, sparsity=0.5, criterion="wanda", calibration=batches)``
(or ``granularity="out_channel", reconstruct=True``); :func:`prune_with_calibration` and
:func:`prune_structured_with_calibration` are the same entries without the dispatch.
"""

from .api import CalibrationError, OneShotResult, plan_calibrated, prune_with_calibration, run_calibrated
from .owl import OWL, outlier_ratio, owl_sparsities
from .perplexity import perplexity
from .rows import keep_n_of_m, keep_per_row
from .sparsegpt import sparsegpt_prune
from .structured import prune_structured_with_calibration
from .wanda import Wanda, wanda_keep

__all__ = [
    "CalibrationError",
    "OWL",
    "OneShotResult",
    "Wanda",
    "keep_n_of_m",
    "keep_per_row",
    "outlier_ratio",
    "owl_sparsities",
    "perplexity",
    "plan_calibrated",
    "prune_structured_with_calibration",
    "prune_with_calibration",
    "run_calibrated",
    "sparsegpt_prune",
    "wanda_keep",
]
