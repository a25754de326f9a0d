"""Why does Concrete ML refuse heavily pruned networks with ``NoParametersFound``? (issue #5)

Trains the benchmark's 64-256-10 MLP pruned by prunekit to Ω non-zeros per neuron (see
``fhe_concrete_ml.py``) and compiles it with ``compile_torch_model`` at n bits:

- as is, and with the remedies a user would try first (``p_error``, ``rounding_threshold_bits``);
- with one change only: Concrete ML's choice between symmetric and asymmetric weight quantization
  forced to symmetric, by replacing its heuristic *in this process* — a diagnostic, not a remedy.

For each run it prints the zero point Concrete ML gave each layer's weights and, per layer, the
largest L1 and L2 norm of a neuron's integer weights: the L1 norm bounds the accumulator
(Σ|q_w|·max|q_x|), the squared L2 norm is the factor by which a weighted sum of ciphertexts
multiplies the noise variance in TFHE (Chillotti et al. 2021), which the crypto-parameter search
must absorb.

Run in the environment with concrete-ml: ``python benchmarks/fhe_concrete_ml_symmetry.py``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from _common import machine, today, write_result
from fhe_concrete_ml import gradual, load_digits_split, mlp, train

import prunekit as pk


def integer_weights(model, bits):
    from concrete.ml.torch.compile import build_quantized_module

    quantized = build_quantized_module(model, load_digits_split()[0], n_bits=bits)
    found = []
    for _, op in quantized.quant_layers_dict.values():
        for value in op.constant_inputs.values():
            if hasattr(value, "qvalues") and value.qvalues.ndim == 2:
                q = value.qvalues.astype(np.int64)  # (out, in) for Gemm with transposed weights
                q = q if q.shape[0] in (256, 10) else q.T
                found.append((int(np.asarray(value.quantizer.zero_point)), q))
    return found


def describe(model, bits) -> str:
    parts = []
    for zero_point, q in integer_weights(model, bits):
        l1 = int(np.abs(q).sum(1).max())
        l2 = float(np.sqrt((q.astype(np.float64) ** 2).sum(1)).max())
        parts.append(f"zp {zero_point}, max L1 {l1}, max L2 {l2:.0f}, nnz {int((q != 0).sum(1).max())}")
    return "; ".join(parts)


def compile_once(model, bits, **options) -> str:
    from concrete.ml.torch.compile import compile_torch_model

    x_train, x_test, _, y_test = load_digits_split()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            circuit_model = compile_torch_model(model, x_train, n_bits=bits, **options)
    except Exception as error:
        message = str(error).strip().splitlines()[0]
        return f"no: {message[:60]} ({time.perf_counter() - start:.0f} s)"
    accuracy = float((circuit_model.forward(x_test, fhe="disable").argmax(1) == y_test).mean())
    width = circuit_model.fhe_circuit.graph.maximum_integer_bit_width()
    return f"yes: {width} bits, quantized acc {accuracy:.3f} ({time.perf_counter() - start:.0f} s)"


def main():
    from concrete.ml.quantization import post_training

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[6])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = load_digits_split()
    heuristic = post_training.PostTrainingAffineQuantization._check_distribution_is_symmetric_around_zero
    rows = []
    for bits in args.bits:
        omega = pk.fhe.max_fan_in(bits, bits, 16)
        model = train(mlp(args.seed), data, args.epochs, args.seed, gradual(omega))
        weights = model[2].weight.detach()
        kept = weights[weights != 0]
        sign_note = f"{int((kept < 0).sum())} negative / {int((kept > 0).sum())} positive of {weights.numel()}"
        runs = [
            ("as is", {}, False),
            ("p_error=0.01", {"p_error": 0.01}, False),
            (f"rounding_threshold_bits={bits}", {"rounding_threshold_bits": bits}, False),
            ("weights forced symmetric (diagnostic)", {}, True),
        ]
        for name, options, force in runs:
            cls = post_training.PostTrainingAffineQuantization
            cls._check_distribution_is_symmetric_around_zero = (
                staticmethod(lambda values: True) if force else staticmethod(heuristic)
            )
            try:
                row = (bits, omega, name, describe(model, bits), compile_once(model, bits, **options))
            finally:
                cls._check_distribution_is_symmetric_around_zero = staticmethod(heuristic)
            print(row, flush=True)
            rows.append(row)
        rows.append((bits, omega, "second layer's surviving weights", sign_note, ""))
    table = "| n bits | Ω | compile | Concrete ML integer weights per layer | compiles |\n|---:|---:|---|---|---|\n"
    table += "\n".join(f"| {b} | {o} | {n} | {d} | {c} |" for b, o, n, d, c in rows)
    import concrete.ml

    text = f"""# Why heavily pruned networks get `NoParametersFound` from Concrete ML

Machine: {machine()}; concrete-ml {concrete.ml.__version__}. Date: {today()}.
Command: `python benchmarks/fhe_concrete_ml_symmetry.py --bits {" ".join(map(str, args.bits))} --epochs {args.epochs} --seed {args.seed}`

The 64-256-10 MLP of `fhe_concrete_ml.md`, pruned by prunekit (gradual, `max_fan_in=Ω`), compiled with
`compile_torch_model(model, X_train, n_bits=n)`. "zp" is the zero point Concrete ML chose for the layer's
weights (0 = symmetric); L1 / L2 are the largest norms of one neuron's integer weights; nnz the largest
number of non-zero integers in a neuron.

{table}
"""
    print(f"wrote {write_result('fhe_concrete_ml_symmetry', text)}")


if __name__ == "__main__":
    main()
