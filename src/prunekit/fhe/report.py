"""``accumulator_report``: does every neuron's integer accumulator fit the FHE bit budget?

For every Linear/Conv layer the weights are quantized (per tensor, :mod:`prunekit.fhe.quantize`)
and, for every output neuron n, the worst case of its raw integer accumulator Σ_i q_w,i · q_x,i is

    M_n = Σ_i |q_w,i| · max|q_x|        (bits: ceil(log2(M_n + 1)), the convention of Ω)

with max|q_x| = 2^n_a − 1 for unsigned inputs and 2^(n_a − 1) for signed ones. Without
calibration inputs every layer's inputs are taken as unsigned (the worst case Ω assumes, and what
follows a ReLU); with them, a layer whose observed inputs go below 0 is taken as signed (Concrete
ML's rule), and the largest accumulator actually reached on those inputs is reported too: that is
the range Concrete measures on its calibration set to size the circuit, so it is what decides
whether ``compile_torch_model`` accepts the model. Biases are left out (Concrete ML adds them after
the integer matmul).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.targets import LayerSelector, Target, find_targets
from .budget import input_max_abs_int, max_fan_in
from .quantize import Quantization, check_bits, magnitude_bits

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerAccumulators:
    """One layer's accumulators. Per-neuron lists are indexed by output neuron (row / filter)."""

    name: str
    kind: str
    neurons: int
    fan_in: int
    weight_scale: float
    weight_zero_point: int
    input_max_int: int
    max_nonzero: int
    worst_case_bits: int
    over_budget: int
    beyond_omega: int
    observed_bits: int | None
    nonzero: list[int] = field(repr=False)
    worst_case: list[int] = field(repr=False)
    observed: list[int] | None = field(repr=False)


@dataclass
class AccumulatorReport:
    """Per-layer accumulator widths; ``str(report)`` is a table, ``report.to_dict()`` plain data."""

    weight_bits: int
    input_bits: int
    accumulator_bits: int
    omega: int
    layers: list[LayerAccumulators]
    warnings: list[str]

    @property
    def fits(self) -> bool:
        """True when no neuron's worst-case accumulator exceeds the budget."""
        return all(layer.over_budget == 0 for layer in self.layers)

    @property
    def worst_case_bits(self) -> int:
        return max(layer.worst_case_bits for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        header = (
            f"accumulators: {self.weight_bits}-bit weights × {self.input_bits}-bit inputs, "
            f"budget {self.accumulator_bits} bits, Ω = {self.omega}"
        )
        columns = [
            "layer",
            "neurons",
            "fan-in",
            "max nnz",
            "worst bits",
            "over budget",
            "weights beyond Ω",
            "observed bits",
        ]
        rows = [
            [
                layer.name or "<root>",
                str(layer.neurons),
                str(layer.fan_in),
                str(layer.max_nonzero),
                str(layer.worst_case_bits),
                str(layer.over_budget),
                str(layer.beyond_omega),
                "-" if layer.observed_bits is None else str(layer.observed_bits),
            ]
            for layer in self.layers
        ]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        lines = [header, "  ".join(c.ljust(w) for c, w in zip(columns, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
        verdict = "fits" if self.fits else "OVER BUDGET"
        lines.append(f"worst case {self.worst_case_bits} bits: {verdict}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def accumulator_report(
    model: nn.Module,
    weight_bits: int,
    input_bits: int,
    accumulator_bits: int = 16,
    *,
    symmetric: bool = True,
    narrow: bool = False,
    input_signed: bool = False,
    calibration: torch.Tensor | tuple | None = None,
    include: LayerSelector | Iterable[LayerSelector] | None = None,
    exclude: LayerSelector | Iterable[LayerSelector] | None = None,
) -> AccumulatorReport:
    """Worst-case (and, with ``calibration``, observed) accumulator bits of every neuron.

    Args:
        model: the model; its Linear/Conv layers are checked (``include``/``exclude`` as for the pruner).
        weight_bits / input_bits: bits of quantized weights and inputs.
        accumulator_bits: the budget (16 for Concrete ML's table lookups).
        symmetric / narrow: the weight quantization (per tensor; see :class:`~prunekit.fhe.quantize.Quantization`).
        input_signed: without calibration, treat every layer's inputs as signed.
        calibration: a batch (tensor or tuple of tensors) run through the model to get each layer's
            input range and its observed accumulators. The model is run in ``eval`` mode and left as it was.

    Neurons whose worst case exceeds 2^accumulator_bits − 1 are counted in ``over_budget``;
    ``beyond_omega`` counts the weights kept beyond Ω (what an exact budget gains). Asymmetric
    weights whose zero point is not 0 turn pruned weights into non-zero integers; the report warns.
    """
    omega = max_fan_in(weight_bits, input_bits, accumulator_bits)
    check_bits(input_bits, "input_bits")
    quantization = Quantization(weight_bits, symmetric, narrow)
    targets = find_targets(model, include, exclude)
    for target in targets:
        if not isinstance(
            target.module, (nn.Linear, *_CONVS, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        ):
            raise ValueError(
                f"layer {target.name!r} ({type(target.module).__name__}) has no accumulator to check; exclude it"
            )
    inputs = _layer_inputs(model, targets, calibration) if calibration is not None else {}
    limit = 2**accumulator_bits - 1
    layers, notes = [], []
    for target in targets:
        weight = target.param.detach()
        quantized = quantization.integers(weight)
        rows = target.to_oik(quantized.values).reshape(target.oik_shape[0], -1)
        nonzero = target.to_oik(weight != 0).reshape(rows.shape).sum(dim=1)
        seen = inputs.get(target.name)
        signed = input_signed if seen is None else bool(seen.min() < 0)
        x_max = input_max_abs_int(input_bits, signed)
        worst = rows.abs().sum(dim=1) * x_max
        observed = None if seen is None else _observed(target, quantized.values, seen, input_bits)
        if quantized.zero_point and bool((weight == 0).any()):
            notes.append(
                f"layer {target.name!r}: asymmetric quantization maps its {int((weight == 0).sum())} zero weights "
                f"to the integer {quantized.zero_point}, so pruned weights still add to the accumulator; "
                "quantize weights symmetrically"
            )
        lopsided = _lopsided_for_concrete_ml(weight)
        if lopsided and symmetric and bool((weight == 0).any()):
            notes.append(f"layer {target.name!r}: {lopsided}")
        layers.append(
            LayerAccumulators(
                name=target.name,
                kind=type(target.module).__name__,
                neurons=rows.shape[0],
                fan_in=rows.shape[1],
                weight_scale=quantized.scale,
                weight_zero_point=quantized.zero_point,
                input_max_int=x_max,
                max_nonzero=int(nonzero.max()),
                worst_case_bits=magnitude_bits(int(worst.max())),
                over_budget=int((worst > limit).sum()),
                beyond_omega=int((nonzero - omega).clamp(min=0).sum()),
                observed_bits=None if observed is None else magnitude_bits(int(observed.max())),
                nonzero=nonzero.tolist(),
                worst_case=worst.tolist(),
                observed=None if observed is None else observed.tolist(),
            )
        )
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return AccumulatorReport(weight_bits, input_bits, accumulator_bits, omega, layers, notes)


def _lopsided_for_concrete_ml(weight: torch.Tensor) -> str | None:
    """Why Concrete ML's post-training quantization would quantize these weights asymmetrically, or None.

    Concrete ML 1.x (``compile_torch_model``) quantizes a weight tensor symmetrically only when its
    3rd percentile is below 0, its 97th above 0, and neither is more than 3 times the other in
    magnitude; otherwise it picks an asymmetric range whose zero point turns every pruned weight into
    a non-zero integer. A heavily pruned layer, mostly zeros with survivors leaning to one sign,
    fails that test.
    """
    flat = weight.detach().reshape(-1).double()
    if flat.numel() < 2:
        return None
    low, high = (float(v) for v in torch.quantile(flat, torch.tensor([0.03, 0.97], dtype=torch.float64)))
    if low < 0 < high and 1 / 3 <= abs(low / high) <= 3:
        return None
    negative, positive = int((flat < 0).sum()), int((flat > 0).sum())
    return (
        f"its weights are lopsided for Concrete ML's post-training quantization ({negative} negative, {positive} "
        f"positive of {flat.numel()}; 3rd/97th percentiles {low:.3g}/{high:.3g}), which will then quantize them "
        "asymmetrically, making every pruned weight a non-zero integer; prune to a pk.fhe.AccumulatorBudget "
        "(it keeps more, smaller weights), or use Brevitas quantization-aware layers and compile_brevitas_qat_model"
    )


@torch.no_grad()
def _layer_inputs(model: nn.Module, targets: list[Target], calibration: Any) -> dict[str, torch.Tensor]:
    """Each target's input on the calibration batch (the model run in eval mode, then restored)."""
    seen: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def record(module, args, output):  # returns None: the output is left alone
            seen.setdefault(name, args[0].detach())

        return record

    handles = [target.module.register_forward_hook(recorder(target.name)) for target in targets]
    was_training = model.training
    try:
        model.eval()
        model(*calibration) if isinstance(calibration, tuple) else model(calibration)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return seen


def _observed(target: Target, weight_ints: torch.Tensor, x: torch.Tensor, input_bits: int) -> torch.Tensor | None:
    """Largest |Σ q_w·q_x| per neuron over the calibration batch, with q_x the raw input integers
    (unsigned, or signed when the inputs go below 0) as an integer matmul sees them; None for a
    transposed conv."""
    module = target.module
    if not isinstance(module, (nn.Linear, *_CONVS)):
        return None
    signed = bool(x.min() < 0)
    quantized = Quantization(input_bits, symmetric=False).integers(x)
    offset = 2 ** (input_bits - 1) if signed else 0
    centered = (quantized.values - quantized.zero_point).double()
    zero_point = quantized.zero_point - offset
    w = weight_ints.double()
    # Raw integers are centered + zero_point; padding holds the zero point too, so the raw sum is
    # the centered convolution plus zero_point times each filter's full weight sum.
    if isinstance(module, nn.Linear):
        acc = centered @ w.T + zero_point * w.sum(dim=1)
        acc = acc.reshape(-1, w.shape[0])
    else:
        acc = module._conv_forward(centered, w, None)
        acc = acc + zero_point * w.sum(dim=tuple(range(1, w.dim()))).reshape(1, -1, *([1] * (acc.dim() - 2)))
        acc = acc.transpose(0, 1).reshape(w.shape[0], -1).T
    return acc.abs().amax(dim=0).round().to(torch.int64)
