"""prunekit's own uniform quantizer: the integers an FHE compiler would see for a float tensor.

Uniform affine quantization (Jacob et al. 2018, as used by Concrete ML): a float x becomes the
integer q = clamp(round(x / scale) + zero_point, q_min, q_max), and x ≈ scale · (q − zero_point).

- **symmetric** (the default for weights): zero_point = 0, scale = max|x| / q_max, integers in
  [−2^(b−1), 2^(b−1) − 1] (``narrow=True``: [−(2^(b−1) − 1), 2^(b−1) − 1]). A zero weight is the
  integer 0, so a pruned weight adds nothing to an accumulator.
- **asymmetric**: scale = (max − min) / (2^b − 1), zero_point = round(−min / scale), integers in
  [0, 2^b − 1]. A zero weight becomes the integer zero_point, which is not 0 in general: an
  integer matmul Σ q_w·q_x then multiplies *every* weight, pruned or not, by its input.

The integer accumulator of one neuron is Σ_i q_w,i · q_x,i; its worst case over all inputs is
Σ_i |q_w,i| · max|q_x| (see :mod:`prunekit.fhe.budget`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def check_bits(value: object, what: str) -> int:
    """A bit width: a whole number ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be a whole number of bits ≥ 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be at least 1 bit, got {value}")
    return value


@dataclass(frozen=True)
class Quantization:
    """How a tensor is quantized: ``bits`` per value, symmetric or asymmetric, per-tensor.

    ``scale`` and ``zero_point`` are computed from the tensor's own range when left out; pass them
    to reproduce the quantization of another tool exactly (``zero_point`` only when asymmetric).
    """

    bits: int
    symmetric: bool = True
    narrow: bool = False
    scale: float | None = None
    zero_point: int | None = None

    def __post_init__(self):
        check_bits(self.bits, "bits")
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and self.scale > 0):
            raise ValueError(f"scale must be a positive number (float units per integer step), got {self.scale!r}")
        if self.zero_point is not None:
            if self.symmetric:
                raise ValueError("a symmetric quantization has zero_point 0; pass symmetric=False to set a zero point")
            if isinstance(self.zero_point, bool) or not isinstance(self.zero_point, int):
                raise TypeError(f"zero_point must be an integer, got {self.zero_point!r}")
            if not 0 <= self.zero_point <= 2**self.bits - 1:
                raise ValueError(
                    f"zero_point must lie in [0, {2**self.bits - 1}] for {self.bits} bits, got {self.zero_point}"
                )
        if self.narrow and self.bits < 2:
            raise ValueError("a narrow symmetric range needs at least 2 bits (1 bit would only hold 0)")

    @property
    def int_range(self) -> tuple[int, int]:
        """(q_min, q_max), the integers this quantization can produce."""
        if not self.symmetric:
            return 0, 2**self.bits - 1
        high = 2 ** (self.bits - 1) - 1
        return (-high if self.narrow else -high - 1), high

    @property
    def max_abs_int(self) -> int:
        """The largest |q| this quantization can produce (2^b − 1 asymmetric, 2^(b−1) symmetric)."""
        low, high = self.int_range
        return max(-low, high)

    def params_for(self, tensor: torch.Tensor) -> tuple[float, int]:
        """(scale, zero_point) for ``tensor``: the given ones, or those that cover its range."""
        low_int, high_int = self.int_range
        zero_point = 0 if self.symmetric else self.zero_point
        if self.scale is not None:
            if zero_point is None:
                low = min(float(tensor.min()), 0.0)
                zero_point = int(min(max(round(-low / self.scale), low_int), high_int))
            return float(self.scale), zero_point
        if self.symmetric:
            largest = float(tensor.abs().max()) if tensor.numel() else 0.0
            # 1 bit symmetric holds only {-1, 0}: scale to the magnitude so the sign survives.
            steps = high_int if high_int > 0 else 1
            return (largest / steps if largest > 0 else 1.0), 0
        # The range always contains 0 so that 0.0 maps to an integer exactly (the zero point).
        low, high = min(float(tensor.min()), 0.0), max(float(tensor.max()), 0.0)
        scale = (high - low) / (high_int - low_int) if high > low else 1.0
        zp = round(-low / scale) if self.zero_point is None else self.zero_point
        return scale, int(min(max(zp, low_int), high_int))

    def integers(self, tensor: torch.Tensor) -> QuantizedTensor:
        """Quantize ``tensor``: its integers (int64, same shape), scale and zero point."""
        scale, zero_point = self.params_for(tensor.detach())
        low, high = self.int_range
        values = torch.round(tensor.detach().double() / scale) + zero_point
        return QuantizedTensor(values.clamp_(low, high).to(torch.int64), scale, zero_point)


@dataclass(frozen=True)
class QuantizedTensor:
    """Integers q with x ≈ scale · (q − zero_point)."""

    values: torch.Tensor
    scale: float
    zero_point: int

    def dequantize(self) -> torch.Tensor:
        return (self.values - self.zero_point).double() * self.scale


def magnitude_bits(value: int) -> int:
    """Bits needed for the unsigned magnitude ``value``: ceil(log2(value + 1)), 0 for 0.

    This is the convention of the fan-in bound Ω (an accumulator of n bits holds magnitudes up to
    2^n − 1); a signed integer of that magnitude needs one more bit for its sign.
    """
    if value < 0:
        raise ValueError(f"a magnitude is ≥ 0, got {value}")
    return int(value).bit_length() if value else 0


def signed_bits(low: int, high: int) -> int:
    """Bits of the smallest integer type holding [low, high]: unsigned when low ≥ 0, else two's complement.

    Concrete counts bit widths this way (e.g. [−8, 7] needs 4 bits, [0, 15] needs 4 bits).
    """
    if low >= 0:
        return max(magnitude_bits(high), 1)
    return max(magnitude_bits(max(-low - 1, high)) + 1, 1)
