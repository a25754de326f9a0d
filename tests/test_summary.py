"""summary(): parameters, non-zeros and MACs, counted by hand on tiny models."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import prunekit as pk

CONV_MACS = 4 * 3 * 3 * 3 * 36  # Conv2d(3→4, 3×3) on 8×8: 6×6 = 36 output positions → 3888
FC_MACS = 144 * 5  # Linear(144 → 5), applied once per sample → 720


def tiny() -> nn.Sequential:
    """conv: Conv2d(3, 4, 3) → ReLU → Flatten → fc: Linear(4·6·6, 5), every parameter non-zero."""
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3),
            relu=nn.ReLU(),
            flat=nn.Flatten(),
            fc=nn.Linear(144, 5),
        )
    )
    with torch.no_grad():
        model.conv.weight.fill_(1.0)
        model.conv.bias.fill_(0.5)
        model.fc.weight.fill_(0.1)
        model.fc.bias.fill_(-1.0)
    return model


def zero_some(model: nn.Sequential) -> None:
    with torch.no_grad():
        model.conv.weight[0] = 0.0  # 27 of 108 conv weights
        model.conv.bias[1] = 0.0  # 1 of 4 conv biases
        model.fc.weight[:, :72] = 0.0  # 360 of 720 fc weights


def test_dense_counts_with_example_inputs():
    s = pk.summary(tiny(), example_inputs=torch.randn(1, 3, 8, 8))
    assert [(row.name, row.kind) for row in s.layers] == [("conv", "Conv2d"), ("fc", "Linear")]
    conv, fc = s.layers
    assert (conv.params, conv.nonzero_params) == (112, 112)
    assert (fc.params, fc.nonzero_params) == (725, 725)
    assert conv.macs == conv.nonzero_macs == CONV_MACS == 3888
    assert fc.macs == fc.nonzero_macs == FC_MACS == 720
    assert s.total_params == 837
    assert s.nonzero_params == 837
    assert s.sparsity == 0.0
    assert s.compression == 1.0
    assert s.macs == 3888 + 720
    assert s.nonzero_macs == 3888 + 720


def test_nonzero_counts_after_zeroing_weights():
    model = tiny()
    zero_some(model)
    s = pk.summary(model, example_inputs=torch.randn(1, 3, 8, 8))
    conv, fc = s.layers
    assert conv.nonzero_params == 81 + 3
    assert fc.nonzero_params == 360 + 5
    assert conv.macs == 3888
    assert conv.nonzero_macs == 81 * 36  # 2916
    assert fc.macs == 720
    assert fc.nonzero_macs == 360
    assert s.total_params == 837
    assert s.nonzero_params == 449
    assert s.sparsity == pytest.approx(1 - 449 / 837)
    assert s.compression == pytest.approx(837 / 449)
    assert s.macs == 4608
    assert s.nonzero_macs == 2916 + 360
    assert conv.sparsity == pytest.approx(1 - 84 / 112)
    assert fc.sparsity == pytest.approx(1 - 365 / 725)


def test_macs_scale_with_batch():
    s = pk.summary(tiny(), example_inputs=torch.randn(2, 3, 8, 8))
    assert s.layers[0].macs == 2 * 3888
    assert s.layers[1].macs == 2 * 720


def test_example_inputs_as_tuple():
    s = pk.summary(tiny(), example_inputs=(torch.randn(1, 3, 8, 8),))
    assert s.macs == 3888 + 720


def test_linear_without_example_inputs_counts_one_application():
    model = tiny()
    zero_some(model)
    s = pk.summary(model)
    conv, fc = s.layers
    assert conv.macs is None and conv.nonzero_macs is None
    assert fc.macs == 720
    assert fc.nonzero_macs == 360
    assert s.macs == 720  # unknown conv MACs count as 0 in the total
    assert s.nonzero_macs == 360
    assert s.nonzero_params == 449


def test_linear_on_sequences_counts_every_position():
    model = nn.Sequential(nn.Linear(4, 3))
    s = pk.summary(model, example_inputs=torch.randn(2, 5, 4))
    assert s.layers[0].macs == 12 * 2 * 5


def test_conv_transpose_and_grouped_conv_macs():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ConvTranspose2d(4, 3, 2))
    s = pk.summary(model, example_inputs=torch.randn(1, 4, 5, 5))
    grouped, transposed = s.layers
    # Grouped: weight (4, 2, 3, 3) = 72 entries, applied at 3×3 output positions.
    assert grouped.macs == 72 * 9
    # Transposed: weight (4, 3, 2, 2) = 48 entries, applied at each of the 3×3 input positions.
    assert transposed.macs == 48 * 9


def test_layer_not_reached_by_the_input_has_zero_macs():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    s = pk.summary(Branchy(), example_inputs=torch.randn(1, 3))
    by_name = {row.name: row for row in s.layers}
    assert by_name["used"].macs == 6
    assert by_name["unused"].macs == 0 and by_name["unused"].nonzero_macs == 0


def test_modules_without_own_parameters_have_no_row_and_others_do():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.BatchNorm1d(4))
    s = pk.summary(model, example_inputs=torch.randn(2, 3))
    assert [(row.name, row.kind) for row in s.layers] == [("0", "Linear"), ("2", "BatchNorm1d")]
    bn = s.layers[1]
    assert bn.params == 8
    assert bn.macs is None


def test_summary_restores_training_mode_and_buffers():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model.train()
    before = {name: b.clone() for name, b in model.named_buffers()}
    pk.summary(model, example_inputs=torch.randn(8, 3))
    assert model.training and model[1].training
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name])


def test_to_dict_keys_and_values():
    model = tiny()
    zero_some(model)
    d = pk.summary(model, example_inputs=torch.randn(1, 3, 8, 8)).to_dict()
    assert set(d) == {
        "total_params",
        "nonzero_params",
        "sparsity",
        "compression",
        "macs",
        "nonzero_macs",
        "layers",
        "notes",
    }
    assert d["total_params"] == 837
    assert d["nonzero_params"] == 449
    assert d["macs"] == 4608
    assert d["nonzero_macs"] == 3276
    assert len(d["layers"]) == 2
    row = d["layers"][0]
    assert set(row) == {"name", "kind", "params", "nonzero_params", "macs", "nonzero_macs", "sparsity"}
    assert row == {
        "name": "conv",
        "kind": "Conv2d",
        "params": 112,
        "nonzero_params": 84,
        "macs": 3888,
        "nonzero_macs": 2916,
        "sparsity": pytest.approx(0.25),
    }


def test_str_lists_layers_and_total():
    model = tiny()
    zero_some(model)
    text = str(pk.summary(model, example_inputs=torch.randn(1, 3, 8, 8)))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["layer", "type"]
    assert any(line.startswith("conv") and "Conv2d" in line and "3,888" in line for line in lines)
    assert any(line.startswith("fc") and "Linear" in line and "720" in line for line in lines)
    total = [line for line in lines if line.startswith("total")]
    assert len(total) == 1
    assert total[-1] == lines[-1]
    assert "837" in total[0] and "449" in total[0] and "4,608" in total[0] and "3,276" in total[0]
    assert repr(pk.summary(model)) == str(pk.summary(model))


def test_str_shows_dash_for_unknown_macs():
    text = str(pk.summary(tiny()))
    conv_line = next(line for line in text.splitlines() if line.startswith("conv"))
    assert conv_line.split()[-2:] == ["-", "-"]


def test_empty_and_fully_zero_models():
    s = pk.summary(nn.ReLU())
    assert s.layers == []
    assert s.total_params == 0 and s.sparsity == 0.0
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    zero = pk.summary(layer)
    assert zero.sparsity == 1.0
    assert zero.compression == float("inf")
    assert zero.layers[0].name == ""
    assert "<root>" in str(zero)


def test_summary_after_prune_matches_masks(tiny_model):
    pruner = pk.prune(tiny_model, sparsity=0.75, scope="local")
    s = pk.summary(tiny_model, example_inputs=torch.randn(1, 3, 8, 8))
    conv, fc = s.layers
    # Local 75% of the weights; biases stay dense.
    assert conv.nonzero_params == 27 + 4
    assert fc.nonzero_params == 180 + 5
    assert conv.nonzero_macs == 27 * 36
    assert fc.nonzero_macs == 180
    assert pruner.sparsity == pytest.approx(0.75)


def test_summary_rejects_non_modules():
    with pytest.raises(TypeError):
        pk.summary(torch.zeros(3))
