"""Prune a network so that it compiles for encrypted inference with Zama's Concrete ML.

Concrete ML runs a quantized network under fully homomorphic encryption, where every neuron's
integer accumulator must fit 16 bits. With n-bit weights and activations, a neuron with at most
Ω = floor((2^16 − 1)/(2^n − 1)²) non-zero weights never overflows; prunekit enforces that per neuron.

This example, at n = 6 bits (Ω = 16 of a fan-in of 64 and 256):

1. prunes a float MLP gradually to Ω per neuron and checks it with ``pk.fhe.accumulator_report``;
2. shows why Concrete ML's post-training quantization (``compile_torch_model``) still refuses it with
   ``NoParametersFound``: it chooses *asymmetric* quantization for the weights of a layer whose
   surviving weights are mostly zeros and lean to one sign, so every pruned weight becomes the
   non-zero integer zero_point and the sparse neuron is a dense one again in the encrypted circuit;
3. does what a user can do instead, two ways:
   a. prune to the exact budget (``pk.fhe.AccumulatorBudget``) rather than Ω: small weights cost
      little, so neurons keep several times Ω weights, the layer stays balanced, Concrete ML keeps
      its weights symmetric, and ``compile_torch_model`` accepts it;
   b. prune to Ω a Brevitas quantization-aware model, whose weight quantizers are symmetric (a
      pruned weight stays the integer 0), compiled with ``compile_brevitas_qat_model``.

Run it where concrete-ml is installed (it brings its own torch; a few minutes on 2 cores)::

    pip install concrete-ml && pip install --no-deps -e .   # from the prunekit checkout
    python examples/fhe_concrete_ml.py
"""

from __future__ import annotations

import argparse
import warnings

import brevitas.nn as qnn
import numpy as np
import torch
from concrete.ml.torch.compile import build_quantized_module, compile_brevitas_qat_model, compile_torch_model
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import prunekit as pk

BITS = 6


def data():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def train_pruned(model, x_train, y_train, max_fan_in, epochs):
    """Adam, batch 64; the cap tightens gradually (Ω: over the first half of training, then fine-tuning)."""
    x, y = torch.tensor(x_train), torch.tensor(y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    total = epochs * ((len(x) + 63) // 64)
    # An exact budget holds for the weights as pruned, so it prunes until the last step.
    end = total if isinstance(max_fan_in, pk.fhe.AccumulatorBudget) else total // 2
    pruner = pk.Pruner(
        model, max_fan_in=max_fan_in, schedule=pk.Gradual(start=0, end=end, every=20), optimizer=optimizer
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            batch = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pruner.step()
    pruner.remove()
    return model.eval()


def try_compile(compile_fn, x_test, y_test):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            circuit_model = compile_fn()
    except RuntimeError as error:
        print(f"   refused: {str(error).splitlines()[0][:100]}")
        return
    accuracy = (circuit_model.forward(x_test, fhe="disable").argmax(1) == y_test).mean()
    bits = circuit_model.fhe_circuit.graph.maximum_integer_bit_width()
    print(f"   compiles: circuit max bit width {bits}, quantized accuracy {accuracy:.3f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    x_train, x_test, y_train, y_test = data()
    omega = pk.fhe.max_fan_in(weight_bits=BITS, input_bits=BITS, accumulator_bits=16)
    print(f"Ω for {BITS}-bit weights and inputs, 16-bit accumulators: {omega} non-zero weights per neuron")

    print("\n1. float MLP, pruned by prunekit to Ω per neuron")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    train_pruned(model, x_train, y_train, omega, args.epochs)
    print(pk.fhe.accumulator_report(model, BITS, BITS, calibration=torch.tensor(x_train)))

    print("\n2. Concrete ML post-training quantization")
    quantized = build_quantized_module(model, x_train, n_bits=BITS)
    zero_points = [
        int(np.asarray(value.quantizer.zero_point))
        for _, op in quantized.quant_layers_dict.values()
        for value in op.constant_inputs.values()
        if hasattr(value, "qvalues") and value.qvalues.ndim == 2
    ]
    print(f"   weight zero points Concrete ML chose per layer: {zero_points} (non-zero = asymmetric)")
    if any(zero_points):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            asymmetric = pk.fhe.accumulator_report(model, BITS, BITS, symmetric=False)
        for layer, zero_point in zip(asymmetric.layers, zero_points):
            if zero_point:
                print(
                    f"   layer {layer.name!r}: every pruned weight becomes the integer {layer.weight_zero_point}; "
                    f"worst-case accumulator {layer.worst_case_bits} bits instead of 16 or fewer"
                )
    try_compile(lambda: compile_torch_model(model, x_train, n_bits=BITS), x_test, y_test)

    print("\n3a. what to do: prune to the exact accumulator budget instead of Ω")
    budget = pk.fhe.AccumulatorBudget(weight_bits=BITS, input_bits=BITS, accumulator_bits=16)
    torch.manual_seed(0)
    exact = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    train_pruned(exact, x_train, y_train, budget, args.epochs)
    report = pk.fhe.accumulator_report(exact, BITS, BITS, calibration=torch.tensor(x_train))
    print(report)
    try_compile(lambda: compile_torch_model(exact, x_train, n_bits=BITS), x_test, y_test)

    print("\n3b. or: Brevitas QAT layers (symmetric weights), pruned to Ω the same way")
    torch.manual_seed(0)
    qat_model = nn.Sequential(
        qnn.QuantIdentity(bit_width=BITS, return_quant_tensor=True),
        qnn.QuantLinear(64, 256, bias=True, weight_bit_width=BITS),
        qnn.QuantReLU(bit_width=BITS, return_quant_tensor=True),
        qnn.QuantLinear(256, 10, bias=True, weight_bit_width=BITS),
    )
    train_pruned(qat_model, x_train, y_train, omega, args.epochs)
    fan_in = [int(pk.fhe.neuron_fan_in(m, m.weight).max()) for m in qat_model if isinstance(m, nn.Linear)]
    print(f"   largest fan-in per layer after pruning: {fan_in}")
    try_compile(lambda: compile_brevitas_qat_model(qat_model, x_train), x_test, y_test)


if __name__ == "__main__":
    main()
