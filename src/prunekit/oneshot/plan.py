"""Validating a calibrated one-shot pruning job before anything is touched (:func:`plan_calibrated`), and
deciding when ``pk.prune`` hands a call to it (:func:`wants_calibration`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.targets import LayerSelector, Target, check_sparsity, find_targets, is_hf_conv1d, resolve_layer_sparsity
from ..methods.criteria import Criterion
from ..methods.granularity import NM, Granularity, Weight, get_granularity
from .blocks import block_device, find_blocks
from .calibration import read_batches
from .owl import OWL
from .progress import check_progress
from .wanda import Wanda

CRITERIA = ("wanda", "sparsegpt", "magnitude")
DATA_AWARE = ("wanda", "sparsegpt")
OFFLOAD = ("auto", True, False)
#: ``sequential`` when it is not given, per criterion (see :func:`prunekit.oneshot.prune_with_calibration`).
SEQUENTIAL_DEFAULT = {"wanda": False, "sparsegpt": True, "magnitude": True}
#: Options of pk.prune that calibrated pruning cannot honour, with the value that means "not used".
_UNUSED_OPTIONS = {
    "scope": "local",
    "coupled": True,
    "prune_outputs": False,
    "round_to": 1,
    "max_layer_sparsity": 1.0,
    "sparsity_in": "channels",
    "prune_only": None,
    "data": None,
    "loss_fn": None,
    "seed": 0,
    "max_fan_in": None,
}
#: Options passed on untouched to the pk.Pruner that holds the masks afterwards.
PRUNER_OPTIONS = ("example_inputs", "optimizer", "mask_gradients")


@dataclass
class OneShotPlan:
    """A validated calibrated pruning job (nothing is touched until :func:`run_calibrated`)."""

    model: nn.Module
    criterion: str
    sparsity: float
    granularity: Granularity
    batches: list[Any]
    stacks: list[tuple[str, nn.ModuleList]]
    block_targets: list[list[list[Target]]]  # [stack][block] -> the targets pruned in that block
    overrides: dict[str, float]
    owl: OWL | None  # OWL's options when layer sparsities come from outlier ratios
    min_kept: int
    storage: str | None
    progress: bool
    left_out: list[str]
    wanda: Wanda | None = None
    #: True: each block's statistics come from the pruned earlier blocks' outputs (two passes per block);
    #: False: from the dense model's activations, one pass per block.
    sequential: bool = True

    @property
    def targets(self) -> list[Target]:
        return [t for stack in self.block_targets for block in stack for t in block]

    @property
    def nm(self) -> tuple[int, int] | None:
        return (self.granularity.n, self.granularity.m) if isinstance(self.granularity, NM) else None


def _criterion_name(criterion: Any) -> str:
    if isinstance(criterion, Wanda):
        return "wanda"
    if isinstance(criterion, str) and criterion in CRITERIA:
        return criterion
    if isinstance(criterion, Criterion) and criterion.name == "magnitude":
        return "magnitude"
    raise ValueError(
        f"criterion {criterion!r} cannot be used with calibration data; calibrated one-shot pruning takes "
        f"{', '.join(map(repr, CRITERIA))}"
    )


def _check_sequential(sequential: Any, criterion: str) -> bool:
    """``sequential`` resolved for ``criterion`` (None: its default, :data:`SEQUENTIAL_DEFAULT`)."""
    if sequential is None:
        return SEQUENTIAL_DEFAULT[criterion]
    if not isinstance(sequential, bool):
        raise TypeError(f"sequential must be True, False or None (the criterion's default), got {sequential!r}")
    if not sequential and criterion != "wanda":
        why = (
            "SparseGPT updates the remaining weights of each layer, and the next block must be calibrated on "
            "the outputs of the updated block"
            if criterion == "sparsegpt"
            else "criterion='magnitude' reads no activations, so there are no statistics to take from one pass"
        )
        raise ValueError(f"sequential=False is for criterion='wanda' only: {why}; leave sequential out")
    return sequential


def wants_calibration(options: Mapping[str, Any]) -> bool:
    """True when ``pk.prune(**options)`` asks for calibrated unstructured or N:M pruning: criterion
    ``"wanda"`` or ``"sparsegpt"``, or ``layer_sparsity="owl"`` (``calibration=`` alone is not enough: other
    criteria may read calibration statistics through the plain pruner)."""
    granularity = options.get("granularity", "weight")
    if not (granularity == "weight" or isinstance(granularity, (Weight, NM))):
        return False  # structured pruning from calibration data is handled elsewhere
    layer_sparsity = options.get("layer_sparsity")
    if isinstance(layer_sparsity, OWL) or (isinstance(layer_sparsity, str) and layer_sparsity == "owl"):
        return True
    criterion = options.get("criterion")
    if isinstance(criterion, Wanda):
        return not criterion.stats  # with statistics at hand it is a plain criterion for pk.Pruner
    return isinstance(criterion, str) and criterion in DATA_AWARE


def plan_calibrated(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    criterion: str | Criterion = "wanda",
    granularity: str | Granularity = "weight",
    calibration: Iterable | None = None,
    layer_sparsity: str | OWL | Mapping[str, float] | None = None,
    include: LayerSelector | Iterable[LayerSelector] | None = None,
    exclude: LayerSelector | Iterable[LayerSelector] | None = None,
    min_kept: int = 1,
    blocks: str | Sequence[str] | None = None,
    offload: bool | str = "auto",
    progress: bool = True,
    sequential: bool | None = None,
    **unused: Any,
) -> OneShotPlan:
    """Validate a calibrated pruning job and return its plan; the model is not touched.

    The calibration iterable is read (once) last, after every other check has passed.
    """
    name = _criterion_name(criterion)
    for option, value in unused.items():
        if option not in _UNUSED_OPTIONS and option not in PRUNER_OPTIONS:
            raise TypeError(f"pk.prune got an unexpected option {option!r}")
        if option in _UNUSED_OPTIONS and value != _UNUSED_OPTIONS[option]:
            raise ValueError(
                f"option {option}={value!r} has no meaning in calibrated one-shot pruning (criterion={name!r}, "
                "which prunes each layer inside the model's blocks from its calibration inputs); remove it"
            )
    if isinstance(layer_sparsity, str) and layer_sparsity != "owl":
        raise ValueError(
            f"layer_sparsity takes 'owl' or a dict {{name pattern: sparsity}} (or pk.OWL(...) for OWL's options), "
            f"got {layer_sparsity!r}"
        )
    owl = OWL() if isinstance(layer_sparsity, str) else layer_sparsity if isinstance(layer_sparsity, OWL) else None
    if calibration is None:
        why = f"criterion={name!r}" if name in DATA_AWARE else "layer_sparsity='owl'"
        if name in DATA_AWARE or owl is not None:  # (magnitude without OWL is refused below)
            raise ValueError(
                f"{why} needs calibration data, and the argument calibration= is missing: pass an iterable of "
                "batches the model accepts, e.g. calibration=[tokenizer(texts, return_tensors='pt', padding=True)]"
            )
    if name == "magnitude" and owl is None:
        if calibration is None:
            raise ValueError(
                "criterion='magnitude' reads no data: prune with pk.prune(model, sparsity, criterion='magnitude')"
            )
        raise ValueError(
            "calibration has no meaning with criterion='magnitude' (it reads no data): use criterion='wanda' or "
            "'sparsegpt', or layer_sparsity='owl', or drop calibration="
        )
    gran = get_granularity(granularity)
    if not isinstance(gran, (Weight, NM)):
        raise ValueError(
            f"calibrated one-shot pruning here is unstructured (granularity='weight') or N:M (pk.NM(n, m)); "
            f"got granularity={gran.name!r}"
        )
    if isinstance(gran, NM):
        if sparsity is not None and abs(float(sparsity) - gran.sparsity) > 1e-9:
            raise ValueError(f"{gran.name} fixes the sparsity at {gran.sparsity:g}; leave sparsity out")
        if owl is not None:
            raise ValueError("layer_sparsity='owl' gives layers different sparsities, which N:M cannot have")
        target = gran.sparsity
    else:
        if sparsity is None:
            raise TypeError("sparsity is required: the fraction of weights to prune, e.g. sparsity=0.5")
        target = check_sparsity(sparsity)
        if owl is not None:
            owl.check_target(target)
    if isinstance(min_kept, bool) or not isinstance(min_kept, int) or min_kept < 0:
        raise ValueError(f"min_kept must be a whole number of weights ≥ 0, got {min_kept!r}")
    if offload not in OFFLOAD:
        raise ValueError(f"offload takes 'auto', True or False, got {offload!r}")
    check_progress(progress)
    sequential = _check_sequential(sequential, name)

    targets = find_targets(model, include, exclude)
    stacks = find_blocks(model, blocks)
    owner = {}
    for s, (_, stack) in enumerate(stacks):
        for b, block in enumerate(stack):
            for module in block.modules():
                owner.setdefault(id(module), (s, b))
    block_targets = [[[] for _ in stack] for _, stack in stacks]
    left_out = []
    for t in targets:
        where = owner.get(id(t.module))
        if where is None:
            left_out.append(t.name)
            continue
        if not (isinstance(t.module, nn.Linear) or is_hf_conv1d(t.module)) or t.param_name != "weight":
            raise ValueError(
                f"layer {t.full_name!r} ({type(t.module).__name__}) inside the blocks is not a Linear layer; "
                f"calibrated pruning handles Linear layers only: exclude it (exclude=[{t.name!r}])"
            )
        gran.validate(t)
        block_targets[where[0]][where[1]].append(t)
    pruned = [t for stack in block_targets for block in stack for t in block]
    if include is not None and left_out:
        raise ValueError(
            f"include selects layers outside the model's blocks ({', '.join(left_out[:5])}), which calibrated "
            "pruning does not prune; name blocks= to cover them, or leave them out of include"
        )
    if not pruned:
        raise ValueError(
            f"no prunable Linear layer inside the blocks {', '.join(p for p, _ in stacks)}; check include/exclude"
        )
    if owl is not None:
        overrides = {}
    else:
        overrides = resolve_layer_sparsity(pruned, layer_sparsity)
        if isinstance(gran, NM) and any(v != 0.0 for v in overrides.values()):
            raise ValueError("with pk.NM a layer_sparsity override can only be 0.0 (leave that layer dense)")
    first = block_device(stacks[0][1][0])
    storage = "cpu" if (offload is True or (offload == "auto" and first is not None and first.type != "cpu")) else None
    batches = read_batches(calibration)
    return OneShotPlan(
        model=model,
        criterion=name,
        sparsity=target,
        granularity=gran,
        batches=batches,
        stacks=stacks,
        block_targets=block_targets,
        overrides=overrides,
        owl=owl,
        min_kept=min_kept,
        storage=storage,
        progress=progress,
        left_out=left_out,
        sequential=sequential,
        wanda=(criterion if isinstance(criterion, Wanda) else Wanda(filled_by_calibration=True))
        if name == "wanda"
        else None,
    )


def pruner_options(plan: OneShotPlan, options: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments for the :class:`prunekit.Pruner` that holds a calibrated job's masks: the same layers
    (the pruned ones, named exactly), granularity and overrides; Wanda keeps its statistics as criterion."""
    exact = {t.name: re.escape(t.name) for t in plan.targets}
    return {
        "sparsity": None if plan.nm else plan.sparsity,
        "criterion": plan.wanda if plan.wanda is not None else "magnitude",
        "granularity": plan.granularity,
        "include": list(exact.values()),
        "layer_sparsity": {exact[name]: value for name, value in plan.overrides.items()} or None,
        "min_kept": plan.min_kept,
        **{key: options[key] for key in PRUNER_OPTIONS if key in options},
    }
