"""Accumulator budgets: how many weights a neuron may keep so that its integer sum fits n_max bits.

Under fully homomorphic encryption (Zama's Concrete ML) a quantized neuron computes the integer
accumulator v = Σ_i q_w,i · q_x,i, and every such integer must fit the circuit's bit budget
(Concrete refuses table lookups on more than 16 bits). Its worst case over all inputs is

    |v| ≤ Σ_i |q_w,i| · max|q_x|                                                  (1)

**Fan-in bound Ω** (Concrete ML documentation, "Pruning"/"Accumulator bit width"; Stoian et al.
2023, *Deep Neural Networks for Encrypted Inference with TFHE*): with n_w-bit weights, n_a-bit
inputs and an n_max-bit accumulator, every term of (1) is at most (2^n_w − 1)(2^n_a − 1), so a
neuron with at most

    Ω = floor((2^n_max − 1) / ((2^n_w − 1)(2^n_a − 1)))                          (2)

non-zero weights can never overflow, whatever its weights and inputs. n_w = n_a = 2, n_max = 16
gives Ω = 65535 // 9 = 7281. :func:`max_fan_in` computes (2).

**Exact budget** (:class:`AccumulatorBudget`): given the actual quantization of the weights,
(1) with the real integers keeps more weights than Ω when most weights are small (|q_w| well
below 2^n_w − 1), which is the common case for trained, roughly Gaussian weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .quantize import Quantization, check_bits


def max_fan_in(weight_bits: int, input_bits: int, accumulator_bits: int = 16) -> int:
    """Ω, the number of non-zero weights per neuron that can never overflow an accumulator (eq. 2).

    Args:
        weight_bits: n_w, bits of a quantized weight (≥ 1).
        input_bits: n_a, bits of a quantized input or activation (≥ 1).
        accumulator_bits: n_max, bits the accumulator may use (Concrete ML's limit is 16).

    Returns:
        floor((2^n_max − 1) / ((2^n_w − 1)(2^n_a − 1))), at least 1.

    Raises ``ValueError`` when a bit width is below 1 or when the budget is so small that not
    even one weight fits (Ω = 0).
    """
    n_w = check_bits(weight_bits, "weight_bits")
    n_a = check_bits(input_bits, "input_bits")
    n_max = check_bits(accumulator_bits, "accumulator_bits")
    largest_term = (2**n_w - 1) * (2**n_a - 1)
    omega = (2**n_max - 1) // largest_term
    if omega == 0:
        raise ValueError(
            f"an accumulator of {n_max} bits cannot hold even one {n_w}-bit weight times one {n_a}-bit input "
            f"(largest product {largest_term} > {2**n_max - 1}), so no neuron could keep a weight (Ω = 0); "
            f"use at least {largest_term.bit_length()} accumulator bits or fewer weight/input bits"
        )
    return omega


def input_max_abs_int(input_bits: int, input_signed: bool = False) -> int:
    """max|q_x| for n_a-bit inputs: 2^n_a − 1 unsigned (the worst case Ω assumes), 2^(n_a − 1) signed."""
    check_bits(input_bits, "input_bits")
    return 2 ** (input_bits - 1) if input_signed else 2**input_bits - 1


@dataclass(frozen=True)
class AccumulatorBudget:
    """Per-neuron exact budget: keep the best weights whose worst-case accumulator (eq. 1) fits.

    Pass it as ``pk.Pruner(model, max_fan_in=pk.fhe.AccumulatorBudget(...))``. At every pruning
    event each layer's weights are quantized with ``weight_quantization`` (per tensor, scale from the
    layer's current weights unless given); then, in each neuron, weights are taken best-first (by
    the pruner's criterion; largest magnitude by default) while Σ|q_w|·max|q_x| ≤ 2^n_max − 1.

    Args:
        weight_bits: bits of a quantized weight.
        input_bits: bits of a quantized input.
        accumulator_bits: the accumulator budget n_max (16 for Concrete ML).
        symmetric: symmetric weights (zero point 0; Concrete ML's choice for weights spread around 0).
        narrow: symmetric range without −2^(n−1).
        scale, zero_point: fix the weight quantization instead of deriving it from each layer.
        input_signed: inputs quantized signed (max|q_x| = 2^(n_a−1)) instead of unsigned (2^n_a − 1).

    The guarantee holds for the weights as they are when pruned; weights trained afterwards change
    the scale, so prune last or check with :func:`prunekit.fhe.accumulator_report`. With asymmetric
    weights a pruned weight is the integer ``zero_point`` and still costs |zero_point| per input.
    """

    weight_bits: int
    input_bits: int
    accumulator_bits: int = 16
    symmetric: bool = True
    narrow: bool = False
    scale: float | None = None
    zero_point: int | None = None
    input_signed: bool = False
    weight_quantization: Quantization = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        max_fan_in(self.weight_bits, self.input_bits, self.accumulator_bits)  # validates, Ω ≥ 1
        quantization = Quantization(self.weight_bits, self.symmetric, self.narrow, self.scale, self.zero_point)
        object.__setattr__(self, "weight_quantization", quantization)

    @property
    def omega(self) -> int:
        """The fan-in bound Ω (eq. 2) for the same bit widths, for comparison."""
        return max_fan_in(self.weight_bits, self.input_bits, self.accumulator_bits)

    @property
    def limit(self) -> int:
        """2^n_max − 1, the largest accumulator magnitude allowed."""
        return 2**self.accumulator_bits - 1

    @property
    def input_max(self) -> int:
        return input_max_abs_int(self.input_bits, self.input_signed)

    def weight_costs(self, weight_oik: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(|q_w| per weight as int64 (O, I, K), |q| of a zero weight): the integer magnitudes of eq. (1)."""
        quantized = self.weight_quantization.integers(weight_oik)
        return quantized.values.abs(), abs(quantized.zero_point)

    def kept_counts(self, weight_oik: torch.Tensor, scores_oik: torch.Tensor, keep_oik: torch.Tensor) -> torch.Tensor:
        """Per neuron, how many of its kept weights (best score first) fit the budget; int64 (O,).

        ``scores_oik`` ranks the weights (higher = keep first); weights already pruned (``keep_oik``
        False) are never counted back in, but with asymmetric quantization they still cost
        |zero_point| each.

        Raises ``ValueError`` when a neuron's pruned weights alone exceed the budget (asymmetric
        quantization with a large zero point), since no pruning can then make it fit.
        """
        out_dim = weight_oik.shape[0]
        costs, zero_cost = self.weight_costs(weight_oik)
        costs = costs.reshape(out_dim, -1)
        keep = keep_oik.reshape(out_dim, -1)
        order = torch.sort(
            scores_oik.reshape(out_dim, -1).masked_fill(~keep, float("-inf")), dim=1, descending=True, stable=True
        ).indices
        sorted_costs = costs.gather(1, order)
        sorted_alive = keep.gather(1, order)
        fan_in = costs.shape[1]
        # Keeping the k best costs their |q| sum, plus |zero_point| for each of the other fan_in − k.
        prefix = torch.cumsum(torch.where(sorted_alive, sorted_costs, 0), dim=1)
        k = torch.arange(1, fan_in + 1, device=costs.device)
        totals = (prefix + (fan_in - k) * zero_cost) * self.input_max
        fits = (totals <= self.limit) & sorted_alive
        if zero_cost and fan_in * zero_cost * self.input_max > self.limit:
            raise ValueError(
                f"with asymmetric weights (zero point {zero_cost}) a neuron of {fan_in} inputs costs "
                f"{fan_in * zero_cost * self.input_max} > {self.limit} even with every weight pruned; "
                "use symmetric=True (pruned weights are then the integer 0)"
            )
        # The longest prefix that fits: the last True index + 1 (0 when none fits).
        positions = torch.where(fits, k, 0)
        return positions.max(dim=1).values
