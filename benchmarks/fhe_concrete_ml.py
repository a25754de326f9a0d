"""FHE-ready pruning against the real compiler: Zama's Concrete ML (issue #5).

A 64-256-10 MLP trained on scikit-learn's digits, at several bit widths n (weights and activations):

- ``dense``: no pruning;
- ``concrete-ml pruning``: Concrete ML's own approach at the same Ω — L1-unstructured pruning of the
  whole weight tensor, once, before training, amount (fan_in − Ω)·fan_out (Ω holds on average only);
- ``prunekit Ω``: ``pk.Pruner(max_fan_in=Ω)``, gradual, every neuron ≤ Ω non-zeros at the end;
- ``prunekit exact``: ``pk.Pruner(max_fan_in=pk.fhe.AccumulatorBudget(n, n, 16))``, gradual.

Each is compiled with ``concrete.ml.torch.compile.compile_torch_model(model, X_train, n_bits=n)``
(post-training quantization) and we record whether it compiles, the circuit's maximum integer bit
width, and accuracy in clear and quantized (Concrete ML's ``forward(fhe="disable")``). For every
model prunekit's :func:`accumulator_report` gives the worst-case and calibration-observed accumulator
bits, and we read the zero points Concrete ML chose for each layer's weights.

The pruned models are then built again with Brevitas quantization-aware layers (symmetric weight
quantizers), pruned the same way by prunekit, and compiled with ``compile_brevitas_qat_model``:
that is what a user must do to get a heavily pruned network through (see the results file).

Needs concrete-ml (which brings its own torch) in its own environment::

    python3 -m venv /tmp/fhe && /tmp/fhe/bin/pip install concrete-ml matplotlib
    /tmp/fhe/bin/pip install --no-deps -e .
    /tmp/fhe/bin/python benchmarks/fhe_concrete_ml.py
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch
from _common import RESULTS, machine, today, write_result
from torch import nn
from torch.nn.utils import prune as torch_prune

import prunekit as pk

BATCH = 64


def load_digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def qat_mlp(seed: int, bits: int) -> nn.Module:
    import brevitas.nn as qnn

    torch.manual_seed(seed)
    return nn.Sequential(
        qnn.QuantIdentity(bit_width=bits, return_quant_tensor=True),
        qnn.QuantLinear(64, 256, bias=True, weight_bit_width=bits),
        qnn.QuantReLU(bit_width=bits, return_quant_tensor=True),
        qnn.QuantLinear(256, 10, bias=True, weight_bit_width=bits),
    )


def train(model, data, epochs, seed, pruner_factory=None):
    """Adam 1e-3, batch 64; ``pruner_factory(model, optimizer, total_steps)`` attaches a pruner."""
    x_train, _, y_train, _ = data
    x, y = torch.tensor(x_train), torch.tensor(y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps_per_epoch = (len(x) + BATCH - 1) // BATCH
    pruner = pruner_factory(model, optimizer, epochs * steps_per_epoch) if pruner_factory else None
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH):
            batch = order[start : start + BATCH]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if pruner is not None:
                pruner.step()
    model.eval()
    if pruner is not None:
        pruner.remove()
    return model


def accuracy(model, data) -> float:
    _, x_test, _, y_test = data
    with torch.no_grad():
        return float((model(torch.tensor(x_test)).argmax(1).numpy() == y_test).mean())


def concrete_ml_pruning(model, omega):
    """Concrete ML's built-in approach: one L1-unstructured call per layer before training,
    amount (fan_in − Ω)·fan_out of the whole tensor; the mask stays fixed during training."""
    for layer in model:
        if isinstance(layer, nn.Linear) and layer.in_features > omega:
            torch_prune.l1_unstructured(layer, "weight", amount=(layer.in_features - omega) * layer.out_features)
    return model


def remove_torch_pruning(model):
    for layer in model:
        if isinstance(layer, nn.Linear) and torch_prune.is_pruned(layer):
            torch_prune.remove(layer, "weight")
    return model


def gradual(limit):
    def factory(model, optimizer, total_steps):
        # Ω holds whatever the weights do: prune over the first half of training, then fine-tune.
        # The exact budget holds for the weights as pruned (their quantization scale moves as they
        # train), so its last pruning event is the last step; the cubic schedule prunes little there.
        exact = isinstance(limit, pk.fhe.AccumulatorBudget)
        schedule = pk.Gradual(start=0, end=total_steps if exact else total_steps // 2, every=20)
        return pk.Pruner(model, max_fan_in=limit, schedule=schedule, optimizer=optimizer)

    return factory


def weight_zero_points(quantized_module) -> list[int]:
    """The zero point Concrete ML chose for each Gemm's weights (0 = symmetric)."""
    found = []
    for _, op in quantized_module.quant_layers_dict.values():
        for value in op.constant_inputs.values():
            if hasattr(value, "qvalues") and value.qvalues.ndim == 2:
                found.append(int(np.asarray(value.quantizer.zero_point)))
    return found


def compile_and_measure(model, data, bits, qat=False) -> dict:
    from concrete.ml.torch.compile import build_quantized_module, compile_brevitas_qat_model, compile_torch_model

    x_train, x_test, _, y_test = data
    row = {"clear_acc": accuracy(model, data)}
    if not qat:
        row["zero_points"] = weight_zero_points(build_quantized_module(model, x_train, n_bits=bits))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = pk.fhe.accumulator_report(model, bits, bits, calibration=torch.tensor(x_train))
        row["worst_bits"] = report.worst_case_bits
        row["max_nnz"] = max(layer.max_nonzero for layer in report.layers)
        row["observed_bits"] = max(layer.observed_bits for layer in report.layers)
    else:
        linears = [m for m in model if isinstance(m, nn.Linear)]
        row["max_nnz"] = max(int(pk.fhe.neuron_fan_in(m, m.weight).max()) for m in linears)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if qat:
                circuit_model = compile_brevitas_qat_model(model, x_train)
            else:
                circuit_model = compile_torch_model(model, x_train, n_bits=bits)
        row["compiles"] = "yes"
        row["max_bit_width"] = circuit_model.fhe_circuit.graph.maximum_integer_bit_width()
        predictions = circuit_model.forward(x_test, fhe="disable").argmax(1)
        row["quant_acc"] = float((predictions == y_test).mean())
    except Exception as error:  # the compiler's refusal is the measurement
        message = str(error).strip().splitlines()[0]
        row["compiles"] = "no: " + ("NoParametersFound" if "NoParametersFound" in message else message[:60])
        row["max_bit_width"] = None
        row["quant_acc"] = None
    row["compile_s"] = time.perf_counter() - start
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 6, 7, 8])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-qat", action="store_true", help="skip the Brevitas QAT runs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = load_digits_split()

    rows = []
    dense = train(mlp(args.seed), data, args.epochs, args.seed)
    for bits in args.bits:
        omega = pk.fhe.max_fan_in(bits, bits, 16)
        variants = {"dense": dense}
        if omega < 256:
            cml = concrete_ml_pruning(mlp(args.seed), omega)
            variants["concrete-ml pruning"] = remove_torch_pruning(train(cml, data, args.epochs, args.seed))
            variants["prunekit Ω"] = train(mlp(args.seed), data, args.epochs, args.seed, gradual(omega))
            budget = pk.fhe.AccumulatorBudget(bits, bits, 16)
            variants["prunekit exact"] = train(mlp(args.seed), data, args.epochs, args.seed, gradual(budget))
        for name, model in variants.items():
            row = {"bits": bits, "omega": omega, "method": name, "quantization": "PTQ"}
            row.update(compile_and_measure(model, data, bits))
            print(row, flush=True)
            rows.append(row)
        if omega < 256 and not args.no_qat:
            for name, limit in (("prunekit Ω", omega), ("prunekit exact", pk.fhe.AccumulatorBudget(bits, bits, 16))):
                model = train(qat_mlp(args.seed, bits), data, args.epochs, args.seed, gradual(limit))
                row = {"bits": bits, "omega": omega, "method": name, "quantization": "Brevitas QAT"}
                row.update(compile_and_measure(model, data, bits, qat=True))
                print(row, flush=True)
                rows.append(row)
    (RESULTS / "fhe_concrete_ml.json").write_text(json.dumps(rows, indent=1))
    write_outputs(rows, args)


def _fmt(value, pattern="{}"):
    return "–" if value is None else pattern.format(value)


def write_outputs(rows, args):
    header = (
        "| n bits | Ω | method | quantization | max nnz / neuron | compiles | circuit max bits | "
        "prunekit worst-case bits | prunekit observed bits | Concrete ML weight zero points | "
        "clear acc | quantized acc | compile s |\n"
        + "|---:" * 2
        + "|---" * 2
        + "|---:"
        + "|---"
        + "|---:" * 3
        + "|---"
        + "|---:" * 3
        + "|\n"
    )
    lines = [
        f"| {r['bits']} | {r['omega']} | {r['method']} | {r['quantization']} | {r['max_nnz']} | {r['compiles']} | "
        f"{_fmt(r['max_bit_width'])} | {_fmt(r.get('worst_bits'))} | {_fmt(r.get('observed_bits'))} | "
        f"{_fmt(r.get('zero_points'))} | {r['clear_acc']:.3f} | {_fmt(r['quant_acc'], '{:.3f}')} | {r['compile_s']:.1f} |"
        for r in rows
    ]
    import concrete.ml

    command = "python benchmarks/fhe_concrete_ml.py " + " ".join(
        [f"--bits {' '.join(map(str, args.bits))}", f"--epochs {args.epochs}", f"--seed {args.seed}"]
        + (["--no-qat"] if args.no_qat else [])
    )
    text = RESULTS_TEMPLATE.format(
        machine=machine(),
        date=today(),
        concrete=concrete.ml.__version__,
        command=command,
        table=header + "\n".join(lines),
    )
    path = write_result("fhe_concrete_ml", text)
    plot(rows, RESULTS / "fhe_concrete_ml.png")
    print(f"wrote {path}")


RESULTS_TEMPLATE = """# FHE-ready pruning compiled with Concrete ML

Machine: {machine}; concrete-ml {concrete}. Date: {date}.
Command: `{command}` (in a separate environment with concrete-ml; see the script's docstring).

64-256-10 MLP (ReLU) on scikit-learn's digits (1,347 training / 450 test images, pixels scaled to [0, 1]),
Adam 1e-3, batch 64, 30 epochs; prunekit prunes gradually (cubic, every 20 steps): to Ω over the first half of\ntraining, then fine-tunes; to the exact budget until the last step (that budget holds for the weights as pruned).
n bits = weights and activations (`compile_torch_model(..., n_bits=n)` or Brevitas `bit_width=n`),
Ω = floor((2^16 − 1)/(2^n − 1)²). "Quantized acc" is Concrete ML's `forward(fhe="disable")` (the quantized
integer model in clear). "Circuit max bits" is `fhe_circuit.graph.maximum_integer_bit_width()`.
prunekit's worst-case bits assume symmetric per-tensor weights and unsigned n-bit inputs; observed bits
are the largest |Σ q_w·q_x| over the training set (what Concrete sizes its circuit from).

{table}

![quantized accuracy and circuit bit width](fhe_concrete_ml.png)
"""


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['method']}\n{'QAT' if r['quantization'] != 'PTQ' else 'PTQ'}" for r in rows]
    bits = sorted({r["bits"] for r in rows})
    fig, axes = plt.subplots(1, len(bits), figsize=(4 * len(bits), 4.5), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, n in zip(axes, bits):
        chosen = [(label, r) for label, r in zip(labels, rows) if r["bits"] == n]
        for i, (_, r) in enumerate(chosen):
            if r["quant_acc"] is None:
                ax.bar(i, 0.02, color="lightgray")
                ax.text(i, 0.05, "refused", rotation=90, ha="center", va="bottom", fontsize=8)
            else:
                ax.bar(i, r["quant_acc"], color="tab:blue")
                ax.text(i, r["quant_acc"] + 0.01, f"{r['max_bit_width']}b", ha="center", fontsize=8)
        ax.set_xticks(range(len(chosen)), [label for label, _ in chosen], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"n = {n} bits (Ω = {chosen[0][1]['omega']})")
        ax.set_ylim(0, 1.08)
    axes[0].set_ylabel("quantized test accuracy (label: circuit max bits)")
    fig.suptitle(f"64-256-10 MLP on digits compiled with Concrete ML ({today()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
