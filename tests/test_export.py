"""Export of compacted models: ONNX (checked in onnxruntime), TorchScript and torch.export give PyTorch's
outputs, for a CNN (torchvision resnet18) and a transformer (a tiny Hugging Face BERT, random weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.export import export_onnx

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
onnxruntime = pytest.importorskip("onnxruntime")


def _close(expected: torch.Tensor, actual: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x)
    small = pk.compact(model, x)
    assert sum(p.numel() for p in small.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())
    return small, x


@pytest.fixture(scope="module")
def bert():
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    pk.prune(model, 0.5, criterion="l2", granularity="out_channel", example_inputs=inputs)
    return pk.compact(model, inputs), inputs


def test_compacted_resnet_exports_to_onnx_torchscript_and_torch_export(resnet, tmp_path):
    small, x = resnet
    result = export_onnx(small, x, tmp_path / "resnet.onnx")
    assert result.max_abs_error is not None and result.max_abs_error < 1e-4
    parameters = sum(p.numel() for p in small.parameters())
    # fp32 weights plus a small graph (batch norms fold into the convolutions, so a little under 4 bytes each)
    assert 0.95 * 4 * parameters <= result.size_bytes < 1.05 * 4 * parameters
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = small(x)
        _close(expected, torch.from_numpy(session.run(None, {"input_0": x.numpy()})[0]))
        _close(expected, torch.jit.trace(small, x)(x))
        _close(expected, torch.jit.script(small)(x))
        _close(expected, torch.export.export(small, (x,)).module()(x))


def test_compacted_bert_exports_to_onnx_and_torch_export(bert, tmp_path):
    small, inputs = bert
    result = export_onnx(small, inputs, tmp_path / "bert.onnx")
    assert result.max_abs_error is not None and result.max_abs_error < 1e-4
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    feed = {name: tensor.numpy() for name, tensor in inputs.items()}
    with torch.no_grad():
        expected = small(**inputs).last_hidden_state
        _close(expected, torch.from_numpy(session.run(None, feed)[0]))
        _close(expected, torch.export.export(small, (), kwargs=inputs).module()(**inputs).last_hidden_state)
        traced = torch.jit.trace(small, example_kwarg_inputs=inputs, strict=False)
        _close(expected, traced(**inputs)["last_hidden_state"])


@pytest.mark.slow
def test_dynamo_exporter_too(resnet, bert, tmp_path):
    pytest.importorskip("onnxscript")
    for name, (model, inputs) in {"resnet": resnet, "bert": bert}.items():
        result = export_onnx(model, inputs, tmp_path / f"{name}.onnx", dynamo=True)
        assert result.max_abs_error < 1e-4
        assert not (tmp_path / f"{name}.onnx.data").exists()  # one self-contained file


class _Counter(nn.Module):
    """Its output depends on how often it ran: an export traces one call, PyTorch's reference is another."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        self.calls += 1
        return self.linear(x) * self.calls


def test_a_wrong_export_is_caught(tmp_path):
    with pytest.raises(ValueError, match="differs from PyTorch's"):
        export_onnx(_Counter(), torch.randn(2, 3), tmp_path / "counter.onnx")


def test_a_sparse_kernel_model_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    fast = pk.to_sparse(model, torch.randn(2, 4), kernel="csr")
    with pytest.raises(ValueError, match="to_dense"):
        export_onnx(fast, torch.randn(2, 4), tmp_path / "fast.onnx")
    assert not (tmp_path / "fast.onnx").exists()
    export_onnx(pk.to_dense(fast), torch.randn(2, 4), tmp_path / "dense.onnx")
