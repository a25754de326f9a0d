"""Reconstruction after structured pruning: refit the layers that read removed channels.

Over 400 lines because finding the layers that read removed channels, the least-squares refit and
the bias compensation share one walk over the model and its restore-on-failure bookkeeping.

When channels (MLP neurons, attention heads, conv channels) are removed, every *consumer* layer loses
input columns. Two corrections are offered:

- **Bias compensation** (FLAP, An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for
  Large Language Models"): the removed channels' mean contribution is folded into the consumer's bias,
  b' = b + W_{:,P}·E[X_P], with E[X_P] the dense model's mean of the removed input channels P over the
  calibration positions (for a convolution, summed over the kernel: border padding is ignored).
- **Least-squares refit** (He et al. 2017, "Channel Pruning for Accelerating Very Deep Neural
  Networks", eq. 1 with the channel choice fixed): the kept weights W' and a bias shift d minimise
  ‖Y − b − W'X_K − d‖² + λ‖W' − W_K‖², with Y the *dense* model's output of the layer and
  X_K the kept input channels as the *pruned* model computes them (so the refit absorbs the errors of
  earlier layers, as He et al. do). Solved in float64 by the damped normal equation
  (XᵀX + λI)Θ = XᵀY + λΘ₀ with a Cholesky factorisation, λ = ``damp`` × mean(diag XᵀX), the shift d
  undamped. Damping towards the masked weights Θ₀ (not towards 0) guarantees the refit's calibration
  error is never above the masked layer's, and with d free, removed channels that are constant are
  compensated exactly whatever the damping. Layers are refit one at a time in the order the model
  first calls them, each from a fresh pass of the pruned model over the calibration batches (stopped
  as soon as that layer has run); the dense outputs Y come from one pass of the model with its dense
  values put back from the copy of the changed tensors (:mod:`.snapshot`). That copy and Y are each
  kept in memory up to :data:`CACHE_BYTES` and in temporary files beyond (:mod:`.spill`). Extra
  memory: at most 2 × :data:`CACHE_BYTES` for the copy of the tensors pruning changes (the pruned
  layers and what is sliced with them, not the whole model) and Y, plus one layer's XᵀX at a time.
  Padding tokens (a batch's 2-D ``attention_mask``) are left out of X and Y.

Where the bias shift goes: into the layer's bias; a layer without one whose every output goes
straight into a BatchNorm shifts that norm's running mean instead (μ' = μ − d, exact in eval mode);
a Linear / Conv layer without either that keeps all its outputs gets a new zero-initialised bias
parameter (``module.bias``; it becomes part of the state dict). Otherwise (no bias, no norm, some
outputs removed) the weights are refit without a shift and a warning names the layer.

Refit layers: ``nn.Linear``, Hugging Face ``Conv1D`` and ``nn.Conv2d`` with ``groups=1`` and zero
padding. Other consumers keep their masked weights and a warning names them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import masks as mask_store
from ..core.targets import Target, is_hf_conv1d
from ..engines.calibration import StopForward, input_rows, run_batch
from .activations import CalibrationRecord, eval_mode
from .progress import with_progress
from .snapshot import TensorSnapshot
from .spill import SpillStore

MODES = (False, True, "least_squares", "bias")


@dataclass
class RefitReport:
    """What reconstruction did to one consumer layer. Errors are Σ‖Y − Ŷ‖² / Σ‖Y‖² over the
    calibration positions, with the masked weights (before) and the refit ones (after)."""

    layer: str
    mode: str
    bias_into: str
    positions: int = 0
    error_before: float = float("nan")
    error_after: float = float("nan")


@dataclass
class Consumer:
    """A layer that reads removed channels: its kept output rows and kept / removed input channels."""

    name: str
    module: nn.Module
    rows: torch.Tensor
    channels: torch.Tensor
    removed: torch.Tensor
    bias_into: str
    norm: nn.Module | None = None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    def weight_matrix(self) -> torch.Tensor:
        """The kept block of the weight as (kept rows, kept channels × kernel positions), float64."""
        weight = self.module.weight.detach()
        if is_hf_conv1d(self.module):
            weight = weight.t()
        block = weight.index_select(0, self.rows).index_select(1, self.channels)
        return block.reshape(len(self.rows), -1).double()

    def removed_matrix(self, dense: TensorSnapshot) -> torch.Tensor:
        """The dense weight (from ``dense``, the copy taken before pruning) of the removed channels as
        (kept rows, removed channels, kernel positions)."""
        weight = dense.dense(self.module, "weight")
        if is_hf_conv1d(self.module):
            weight = weight.t()
        block = weight.index_select(0, self.rows).index_select(1, self.removed)
        return block.reshape(len(self.rows), len(self.removed), -1).double()

    def write_weight(self, matrix: torch.Tensor) -> None:
        weight = self.module.weight
        view = weight.t() if is_hf_conv1d(self.module) else weight
        shape = (len(self.rows), len(self.channels), *view.shape[2:])
        block = view.index_select(0, self.rows)
        block[:, self.channels] = matrix.reshape(shape).to(weight.dtype)
        view[self.rows] = block
        keep = mask_store.get_mask(self.module, "weight")
        if keep is not None:  # entries of the refit block pruned before (e.g. unstructured) stay zero
            mask_store.zero_pruned(weight, keep)

    def features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The layer input's kept channels as a (positions, features) matrix (padding tokens dropped
        when the token ``mask`` fits, as in every calibration statistic)."""
        if self.is_conv:
            conv = self.module
            kept = x.index_select(1, self.channels)
            patches = F.unfold(kept, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
            return patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return input_rows(x, True, mask).index_select(1, self.channels)

    def outputs(self, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The layer output's kept rows as a (positions, rows) matrix (padding dropped as in :meth:`features`)."""
        if self.is_conv:
            y = y.movedim(1, -1)
            return y.reshape(-1, y.shape[-1]).index_select(1, self.rows)
        return input_rows(y, True, mask).index_select(1, self.rows)

    def bias_rows(self) -> torch.Tensor | None:
        bias = self.module.bias if self.bias_into == "bias" else None
        return None if bias is None else bias.detach().index_select(0, self.rows).double()

    def shift(self, delta: torch.Tensor, added: list[nn.Module]) -> None:
        """Add ``delta`` (per kept row) to the layer's output, where :attr:`bias_into` says."""
        if self.bias_into == "bias":
            bias = self.module.bias
            bias[self.rows] += delta.to(bias.dtype)
        elif self.bias_into == "batchnorm":
            mean = self.norm.running_mean
            mean[self.rows] -= delta.to(mean.dtype)
        elif self.bias_into == "new bias":
            weight = self.module.weight
            out = weight.shape[1] if is_hf_conv1d(self.module) else weight.shape[0]
            bias = torch.zeros(out, dtype=weight.dtype, device=weight.device)
            bias[self.rows] = delta.to(weight.dtype)
            self.module.bias = nn.Parameter(bias, requires_grad=weight.requires_grad)
            added.append(self.module)


def kept_inputs(target: Target) -> torch.Tensor | None:
    """Bool per input channel of a target's weight: any weight reading it is kept (None: no mask)."""
    keep = mask_store.get_mask(target.module, target.param_name)
    return None if keep is None else target.to_oik(keep).any(dim=2).any(dim=0)


def find_consumers(
    targets: list[Target], record: CalibrationRecord, kept_before: dict[str, torch.Tensor | None]
) -> tuple[list[Consumer], list[str]]:
    """The masked layers that lost input channels since ``kept_before`` (:func:`kept_inputs` of each
    target before pruning), in call order, and the names of those that cannot be refit (with why)."""
    found, skipped = {}, []
    for target in targets:
        keep = mask_store.get_mask(target.module, target.param_name)
        if keep is None:
            continue
        oik = target.to_oik(keep)
        kept_in = oik.any(dim=2).any(dim=0)
        kept_rows = oik.any(dim=2).any(dim=1)
        before = kept_before.get(target.full_name)
        unchanged = bool(kept_in.all()) if before is None else bool((kept_in == before.to(kept_in.device)).all())
        if unchanged or not bool(kept_rows.any()):
            continue
        module = target.module
        reason = _unsupported(target)
        stats = record.statistics.get(target.name)
        if reason is None and (stats is None or not stats.width):
            reason = "it was never called as a module on a positional tensor during calibration"
        if reason is not None:
            skipped.append(f"{target.name} ({reason})")
            continue
        device = keep.device
        rows = torch.nonzero(kept_rows).reshape(-1).to(device)
        found[target.name] = Consumer(
            target.name,
            module,
            rows,
            torch.nonzero(kept_in).reshape(-1).to(device),
            torch.nonzero(~kept_in).reshape(-1).to(device),
            *_bias_sink(target, record, bool(kept_rows.all())),
        )
    ordered = [found[name] for name in record.call_order if name in found]
    return ordered, skipped


def _unsupported(target: Target) -> str | None:
    module = target.module
    if target.param_name != "weight":
        return f"its weight {target.param_name!r} is not applied as a plain linear map"
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped convolution"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "padding other than explicit zeros"
        return None
    return f"{type(module).__name__} is not a Linear or a Conv2d"


def _bias_sink(target: Target, record: CalibrationRecord, all_rows_kept: bool) -> tuple[str, nn.Module | None]:
    module = target.module
    if isinstance(getattr(module, "bias", None), nn.Parameter):
        return "bias", None
    norm = record.batchnorm_after.get(target.name)
    if norm is not None and getattr(norm, "running_mean", None) is not None:
        return "batchnorm", norm
    if all_rows_kept and hasattr(module, "bias"):
        return "new bias", None
    return "none", None


def compensate_biases(
    dense: TensorSnapshot, consumers: list[Consumer], record: CalibrationRecord, added: list[nn.Module]
) -> list[RefitReport]:
    """FLAP's bias compensation, b' = b + W_{:,P}·E[X_P], from the dense model's statistics and the
    dense weights of the removed channels (``dense``: the copy taken before pruning)."""
    reports = []
    for layer in consumers:
        report = RefitReport(layer.name, "bias", layer.bias_into)
        if layer.bias_into == "none":
            reports.append(report)
            continue
        mean = record.statistics[layer.name].mean.to(layer.removed.device).index_select(0, layer.removed)
        delta = (layer.removed_matrix(dense).sum(dim=2) * mean).sum(dim=1)
        with torch.no_grad():
            layer.shift(delta, added)
        reports.append(report)
    return reports


class _Normal:
    """Sums of the normal equation of one layer's refit over calibration positions, in float64."""

    def __init__(self, width: int, rows: int, device: torch.device, intercept: bool):
        size = width + int(intercept)
        self.intercept = intercept
        self.gram = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.cross = torch.zeros(size, rows, dtype=torch.float64, device=device)
        self.residual_squares = 0.0
        self.output_squares = 0.0
        self.positions = 0

    def add(self, features: torch.Tensor, residual: torch.Tensor, output: torch.Tensor) -> None:
        features = features.double()
        if self.intercept:
            features = torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)
        self.gram.addmm_(features.t(), features)
        self.cross.addmm_(features.t(), residual)
        self.residual_squares += float(residual.square().sum())
        self.output_squares += float(output.double().square().sum())
        self.positions += features.shape[0]

    def error(self, theta: torch.Tensor) -> float:
        """Σ‖R − Xθ‖² / Σ‖Y‖² for a solution θ, from the sums alone."""
        value = (
            self.residual_squares - 2 * float((theta * self.cross).sum()) + float((theta * (self.gram @ theta)).sum())
        )
        return max(value, 0.0) / max(self.output_squares, 1e-300)


def solve_damped(
    gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor, damp: float, layer: str, free: int = 0
) -> torch.Tensor:
    """Θ = (G + Λ)⁻¹(C + ΛΘ₀) with Λ = λ on the diagonal except the last ``free`` entries (the bias
    shift, left undamped: its equation always has the positions' count on its diagonal) and
    λ = damp × mean of the other diagonal entries of G; by Cholesky. When G + Λ is not positive
    definite in floating point, λ grows tenfold (up to 6 times), then a warning and a least-squares solve."""
    size = gram.shape[0]
    damped = gram.diagonal()[: size - free]
    scale = float(damped.mean()) if damped.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    mask = torch.ones(size, dtype=gram.dtype, device=gram.device)
    if free:
        mask[size - free :] = 0
    factor = max(damp, 0.0)
    for _ in range(7):
        lam = factor * scale * mask
        lower, info = torch.linalg.cholesky_ex(gram + torch.diag(lam))
        if int(info) == 0:
            return torch.cholesky_solve(cross + lam.unsqueeze(1) * prior, lower)
        factor = max(factor * 10, 1e-10)
    warnings.warn(
        f"reconstruction of {layer}: the normal equation stayed singular after raising the damping to "
        f"{factor / 10:g}; solved by least squares instead (more calibration data helps)",
        stacklevel=3,
    )
    lam = factor * scale * mask
    return torch.linalg.lstsq(gram + torch.diag(lam), cross + lam.unsqueeze(1) * prior).solution


def refit_least_squares(
    model: nn.Module, dense: TensorSnapshot, batches: list[Any], consumers: list[Consumer],
    record: CalibrationRecord, damp: float, added: list[nn.Module], progress: bool = False,
) -> list[RefitReport]:  # fmt: skip
    """Refit each consumer in call order against the dense model's outputs (see the module docstring);
    ``dense``: the copy of the changed tensors taken before pruning, which recreates the dense model for
    the one pass that records those outputs; ``progress``: a bar over the refit layers."""
    reports = []
    with dense.dense_model():
        cached = dense_outputs(model, batches, consumers, record)
    try:
        for layer in with_progress(consumers, progress, "prunekit refit", "layer"):
            reports.append(_refit(model, layer, batches, cached, record, damp, added))
    finally:
        cached.close()
    return reports


def _refit(
    model: nn.Module, layer: Consumer, batches: list[Any], cached: OutputStore, record: CalibrationRecord,
    damp: float, added: list[nn.Module],
) -> RefitReport:  # fmt: skip
    intercept = layer.bias_into != "none"
    width = len(layer.channels) * (layer.module.weight[0, 0].numel() if layer.is_conv else 1)
    normal = _Normal(width, len(layer.rows), layer.rows.device, intercept)
    bias = layer.bias_rows()
    for index, batch in enumerate(batches):
        expected = record.calls[layer.name][index]
        if not expected:
            continue
        outputs = cached.get(layer.name, index)
        inputs = _capture(model, layer.module, batch, index, expected, "input")
        for x, y in zip(inputs, outputs):
            target = y.double()
            residual = target if bias is None else target - bias
            normal.add(layer.features(x, record.masks[index]), residual, target)
    prior = layer.weight_matrix().t()
    if intercept:
        prior = torch.cat([prior, prior.new_zeros(1, prior.shape[1])])
    theta = solve_damped(normal.gram, normal.cross, prior, damp, layer.name, int(intercept))
    report = RefitReport(layer.name, "least_squares", layer.bias_into, normal.positions)
    report.error_before, report.error_after = normal.error(prior), normal.error(theta)
    with torch.no_grad():
        layer.write_weight(theta[:width].t())
        if intercept:
            layer.shift(theta[width], added)
    return report


#: Most bytes of dense-model outputs, and separately of the dense copy of the changed tensors, kept in
#: memory for the whole call; the rest is written to a temporary directory and read back when needed
#: (the same values, no second model in memory).
CACHE_BYTES = 2 << 30


class OutputStore:
    """The dense outputs of the consumers, ``[layer][batch]`` → one matrix per call: in memory up to
    :data:`CACHE_BYTES`, the rest in files of a temporary directory (removed by :meth:`close`)."""

    def __init__(self, consumers: list[Consumer], batches: int):
        self.found = {layer.name: [[] for _ in range(batches)] for layer in consumers}
        self.store = SpillStore(CACHE_BYTES)

    def add(self, name: str, index: int, matrix: torch.Tensor) -> None:
        self.found[name][index].append(self.store.put(matrix))

    def get(self, name: str, index: int) -> list[torch.Tensor]:
        return [self.store.get(handle) for handle in self.found[name][index]]

    def close(self) -> None:
        self.store.close()


def dense_outputs(
    model: nn.Module, batches: list[Any], consumers: list[Consumer], record: CalibrationRecord
) -> OutputStore:
    """The kept output rows of every consumer on every batch, from one pass of ``model`` (run it while
    it holds its dense values, :meth:`.snapshot.TensorSnapshot.dense_model`), padding tokens dropped."""
    store = OutputStore(consumers, len(batches))
    by_module = {layer.module: layer for layer in consumers}
    current = [0]

    def keep(module, _args, output):
        layer = by_module[module]
        store.add(layer.name, current[0], layer.outputs(output.detach(), record.masks[current[0]]))

    handles = [module.register_forward_hook(keep) for module in by_module]
    try:
        with eval_mode(model):
            for index, batch in enumerate(batches):
                current[0] = index
                run_batch(model, batch, index)
    except BaseException:
        store.close()
        raise
    finally:
        for handle in handles:
            handle.remove()
    return store


def _capture(model: nn.Module, module: nn.Module, batch: Any, index: int, expected: int, what: str = "output") -> list:
    """The inputs (or outputs) of ``module`` on its ``expected`` calls while ``model`` runs ``batch``;
    the pass stops right after the last of them."""
    seen = []

    def keep(value):
        seen.append(value.detach())
        if len(seen) == expected:
            raise StopForward

    if what == "input":
        handle = module.register_forward_pre_hook(lambda _m, args: keep(args[0]))
    else:
        handle = module.register_forward_hook(lambda _m, _args, out: keep(out))
    try:
        with eval_mode(model):
            run_batch(model, batch, index)
    except StopForward:
        pass
    finally:
        handle.remove()
    return seen


def warn_skipped(skipped: list[str], bias_none: list[str]) -> None:
    """Say which consumer layers reconstruction could not correct, and why."""
    if skipped:
        warnings.warn("reconstruction left these layers with their masked weights: " + "; ".join(skipped), stacklevel=3)
    if bias_none:
        warnings.warn(
            "these layers have no bias, feed no BatchNorm and lose outputs, so they get no bias correction: "
            + ", ".join(bias_none),
            stacklevel=3,
        )
