"""File sizes of exported models, dense and compacted: ONNX (checked in onnxruntime), TorchScript, torch.export.

Models (random weights): torchvision resnet18 (1000 classes, 224×224 inputs) and a BERT-style encoder
(Hugging Face BertModel, 4 layers, hidden 256, 4 heads, FFN 1024, vocabulary 30522). Each is pruned with
``granularity="out_channel"`` (scope local, 50% of every family, L2 norm) and ``pk.compact``-ed; both forms
are exported with ``pk.export_onnx`` (TorchScript-based exporter; every output checked against PyTorch's),
``torch.jit.save(torch.jit.trace(...))`` and ``torch.export.save(torch.export.export(...))``.

    python benchmarks/export_sizes.py     # writes results/export_sizes.md
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.export import export_onnx  # noqa: E402


class _Keywords(nn.Module):
    """Positional inputs → a Hugging Face model's keywords, last_hidden_state out (for trace/export)."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs))).last_hidden_state


def models():
    import torchvision
    import transformers

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    config = transformers.BertConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
    )
    bert = transformers.BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 32))
    return {
        "resnet18": (resnet, torch.randn(1, 3, 224, 224)),
        "BERT 4×256": (bert, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
    }


def sizes(model: nn.Module, inputs, folder: Path, tag: str) -> dict[str, int | float]:
    onnx = export_onnx(model, inputs, folder / f"{tag}.onnx")
    traced_model = model if isinstance(inputs, torch.Tensor) else _Keywords(model, list(inputs)).eval()
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs.values())
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(traced_model, args, strict=False), folder / f"{tag}.ts")
        torch.export.save(torch.export.export(traced_model, args), folder / f"{tag}.pt2")
    torch.save(model.state_dict(), folder / f"{tag}.pt")
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "state_dict": (folder / f"{tag}.pt").stat().st_size,
        "onnx": onnx.size_bytes,
        "onnx_error": onnx.max_abs_error,
        "torchscript": (folder / f"{tag}.ts").stat().st_size,
        "torch_export": (folder / f"{tag}.pt2").stat().st_size,
    }


def main() -> None:
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, (model, inputs) in models().items():
            rows.append((name, "dense", sizes(model, inputs, folder, "dense")))
            pruned = copy.deepcopy(model)
            pk.prune(pruned, 0.5, criterion="l2", granularity="out_channel", scope="local", example_inputs=inputs)
            small = pk.compact(pruned, inputs)
            rows.append((name, "compacted (50% of channels)", sizes(small, inputs, folder, "small")))
    mb = 1e6
    lines = [
        "# Exported file sizes: dense and compacted",
        "",
        f"Command: `python benchmarks/export_sizes.py` ({time.perf_counter() - started:.0f} s). Date {_common.today()}. "
        f"Machine: {_common.machine()}; prunekit {pk.__version__}.",
        "",
        "Random weights; compacted = `pk.prune(model, 0.5, criterion='l2', granularity='out_channel', scope='local', "
        "example_inputs=x)` then `pk.compact(model, x)`. ONNX by `pk.export_onnx` (torch.onnx.export, TorchScript-"
        "based exporter; onnxruntime's outputs checked against PyTorch's, largest difference in the table); "
        "TorchScript = `torch.jit.save(torch.jit.trace(...))`; torch.export = `torch.export.save` (.pt2). MB = 10⁶ bytes.",
        "",
        "| model | form | parameters | state_dict MB | ONNX MB | ONNX max abs error | TorchScript MB | torch.export MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, form, s in rows:
        lines.append(
            f"| {name} | {form} | {s['params']:,} | {s['state_dict'] / mb:.2f} | {s['onnx'] / mb:.2f} | "
            f"{s['onnx_error']:.1e} | {s['torchscript'] / mb:.2f} | {s['torch_export'] / mb:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    _common.write_result("export_sizes", text)
    print(text)


if __name__ == "__main__":
    main()
