"""The one entry point of one-shot pruning, :func:`prune`: it hands each kind of job to the part
that does it — calibrated unstructured and N:M pruning (Wanda, SparseGPT, OWL) to
:mod:`prunekit.oneshot`, everything else to a :class:`~prunekit.Pruner` — and returns the pruner
that holds the masks.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .core.distributed import unwrap_data_parallel
from .core.sharding import has_sharded_parameters
from .methods.granularity import get_granularity
from .oneshot import api as oneshot
from .oneshot.structured import prune_structured_with_calibration
from .pruner import Pruner


def wants_structured_calibration(options: dict[str, Any]) -> bool:
    """Structured pruning from calibration data: ``reconstruct=`` given, or whole output channels with
    ``calibration=`` (handed to :func:`prunekit.oneshot.prune_structured_with_calibration`)."""
    granularity = options.get("granularity", "weight")
    try:
        whole_channels = get_granularity(granularity).whole_output_channels
    except (TypeError, ValueError):
        return False  # the Pruner says what is wrong with it
    return "reconstruct" in options or (whole_channels and options.get("calibration") is not None)


def prune(model: nn.Module, sparsity: float | None = None, **options: Any) -> Pruner:
    """Prune ``model`` once, now, and return the :class:`Pruner` holding its masks.

    Takes the same arguments as :class:`Pruner` (except ``schedule``); for calibrated unstructured and
    N:M methods (``criterion="wanda"`` / ``"sparsegpt"``, ``layer_sparsity="owl"``) those of
    :func:`prunekit.oneshot.prune_with_calibration` (``calibration=``, ``blocks=``, ...), and for
    structured pruning from calibration data (``granularity="out_channel"`` with ``calibration=``,
    ``reconstruct=True``) those of :func:`prunekit.oneshot.prune_structured_with_calibration`. Keep the
    returned pruner to fine-tune with the masks enforced (call ``pruner.step()`` after each optimizer
    step, or attach the optimizer), or call ``pruner.remove()`` for a plain model.

    Example::

        pk.prune(model, sparsity=0.9, criterion="magnitude", granularity="weight", scope="global")
        pk.prune(model, sparsity=0.5, criterion="sparsegpt", calibration=batches)
    """
    if "schedule" in options:
        raise TypeError("pk.prune prunes once, now; for a schedule use pk.Pruner(..., schedule=...)")
    calibrated = wants_structured_calibration(options) or oneshot.wants_calibration(options)
    if calibrated and isinstance(model, nn.Module) and has_sharded_parameters(unwrap_data_parallel(model)):
        raise ValueError(
            "calibrated one-shot pruning (Wanda, SparseGPT, OWL, structured pruning with calibration=) runs "
            "the model layer by layer and rewrites weights, which FSDP2's sharded parameters do not allow: "
            "prune the unsharded model (on one rank, or before fully_shard), then shard the pruned model"
        )
    if wants_structured_calibration(options):
        # pk.prune's own default granularity, so that reconstruct=True alone is refused for it
        return prune_structured_with_calibration(model, sparsity, **{"granularity": "weight", **options})
    if oneshot.wants_calibration(options):
        plan = oneshot.plan_calibrated(model, sparsity, **options)  # validates everything, touches nothing
        pruner = Pruner(model, **oneshot.pruner_options(plan, options))  # adopts the masks stored below
        try:
            pruner.calibration_report = oneshot.run_calibrated(plan)
        except BaseException:
            pruner.abandon()  # a batch the model rejects is found before any weight changes
            raise
        pruner.mark_pruned()
        return pruner
    pruner = Pruner(model, sparsity, **options)
    try:
        pruner.prune()
    except BaseException:
        pruner.abandon()  # the failed prune changed no mask; only the new hooks must go
        raise
    return pruner
