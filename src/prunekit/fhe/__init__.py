"""FHE-ready pruning: keep every neuron's integer accumulator within a bit budget (Zama's Concrete ML).

- :func:`max_fan_in` — Ω, the non-zero weights per neuron that can never overflow (Concrete ML's bound);
- ``pk.Pruner(model, max_fan_in=Ω or AccumulatorBudget(...))`` — the per-neuron cap (:mod:`.fan_in`);
- :class:`AccumulatorBudget` — the exact budget from the quantized weights (:mod:`.budget`);
- :func:`accumulator_report` — verify a model: worst-case and observed accumulator bits per neuron;
- :class:`Quantization` — prunekit's own uniform quantizer (:mod:`.quantize`).

Example::

    omega = pk.fhe.max_fan_in(weight_bits=2, input_bits=2, accumulator_bits=16)   # 7281
    pruner = pk.Pruner(model, max_fan_in=omega, schedule=pk.Gradual(start=0, end=1000, every=50))
    ...  # train, calling pruner.step() after each optimizer step
    print(pk.fhe.accumulator_report(model, weight_bits=2, input_bits=2))
"""

from .budget import AccumulatorBudget, input_max_abs_int, max_fan_in
from .fan_in import FanInConstraint, neuron_fan_in
from .quantize import Quantization, QuantizedTensor
from .report import AccumulatorReport, LayerAccumulators, accumulator_report

__all__ = [
    "AccumulatorBudget",
    "AccumulatorReport",
    "FanInConstraint",
    "LayerAccumulators",
    "Quantization",
    "QuantizedTensor",
    "accumulator_report",
    "input_max_abs_int",
    "max_fan_in",
    "neuron_fan_in",
]
