"""Structured pruning aimed at parameters or MACs instead of channels, and heads-only / width-only pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention_heads import SelfAttentionNet
from test_attention_heads import _inputs as _attention_inputs
from test_structure import ConcatNet, ResidualNet, TinyAttention, _params, _randomize_norms
from torch import nn

import prunekit as pk
from prunekit.core.masks import MASK_PREFIX
from prunekit.structure import trace_dependencies
from prunekit.structure.cost import UnitCosts
from prunekit.structure.units import removed_units
from prunekit.summary import weight_applications


def _remove_units_by_zeroing(model: nn.Module, deps, pruned: torch.Tensor) -> nn.Module:
    """Zero every parameter slice that makes the pruned units (filters, biases, norm entries);
    pk.compact then removes exactly them."""
    with torch.no_grad():
        for piece in deps.slices:
            if not piece.consumer and piece.tensor_name in piece.module._parameters:
                piece.tensor.index_fill_(piece.dim, torch.nonzero(piece.removed(pruned)).reshape(-1), 0.0)
    return model


def test_costs_of_a_hidden_layer_by_hand():
    # 4 → 6 → 3 MLP: removing 2 of the 6 hidden neurons leaves (4·4 + 4) + (3·4 + 3) = 35 of 51 parameters,
    # and, applied at 5 positions, 5 · (16 + 12) = 140 of 5 · (24 + 18) = 210 MACs.
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    deps = trace_dependencies(model, x)
    assert deps.num_units == 6
    costs = UnitCosts(model, deps, weight_applications(model, x))
    pruned = torch.tensor([True, False, True, False, False, False])
    assert costs.kept(pruned) == (35, 140)
    assert (costs.total_params, costs.total_macs) == (51, 210)
    assert costs.removed_fraction(pruned, "params") == pytest.approx(16 / 51)
    with pytest.raises(ValueError, match="unknown measure"):
        costs.removed_fraction(pruned, "bytes")


@settings(max_examples=15, deadline=None)
@given(
    net=st.sampled_from(["residual", "concat", "attention", "multihead"]),
    seed=st.integers(0, 10_000),
    fraction=st.floats(0.0, 0.9),
)
def test_counted_costs_equal_the_compacted_model(net, seed, fraction):
    build, x = {
        "residual": (lambda: _randomize_norms(ResidualNet()), torch.randn(2, 3, 8, 8)),
        "concat": (ConcatNet, torch.randn(2, 3, 6, 6)),
        "attention": (TinyAttention, torch.randn(2, 5, 16)),
        "multihead": (lambda: SelfAttentionNet(batch_first=True), _attention_inputs(True)),
    }[net]
    torch.manual_seed(seed)
    model = build().eval()
    deps = trace_dependencies(model, x, reuse=False)
    costs = UnitCosts(model, deps, weight_applications(model, x))
    pruned = torch.rand(deps.num_units, generator=torch.Generator().manual_seed(seed)) < fraction
    # Keep one unit of every family, so that no layer is emptied.
    for family in range(len(deps.families)):
        members = torch.nonzero(deps.unit_family == family).reshape(-1)
        pruned[members[0]] = False
    params, macs = costs.kept(pruned)
    small = pk.compact(_remove_units_by_zeroing(model, deps, pruned), x)
    assert params == _params(small)
    after = pk.summary(small, x)
    assert macs == after.macs - after.attention_macs  # the costs count Conv/Linear MACs


@pytest.mark.parametrize("measure", ["params", "macs"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_a_parameter_or_mac_target_removes_at_least_that_fraction_and_little_more(measure, scope):
    torch.manual_seed(0)
    model = _randomize_norms(ResidualNet(width=16)).eval()
    x = torch.randn(1, 3, 8, 8)
    dense = pk.summary(model, x)
    pruner = pk.prune(
        model, 0.4, granularity="out_channel", scope=scope, example_inputs=x, sparsity_in=measure, min_kept=1
    )
    small = pk.compact(model, x)
    after = pk.summary(small, x)
    saved = 1 - (after.total_params / dense.total_params if measure == "params" else after.macs / dense.macs)
    assert saved >= 0.4
    # The pruner takes the smallest unit count reaching the target: one unit fewer falls short.
    deps = pruner.dependencies
    costs = UnitCosts(model, deps, weight_applications(model, x))
    removed = removed_units(deps)
    assert costs.removed_fraction(removed, measure) == pytest.approx(saved)
    channels_alone = pk.prune(
        _randomize_norms(ResidualNet(width=16)).eval(), 0.4, granularity="out_channel", scope=scope, example_inputs=x
    )
    # A channel fraction of 0.4 removes more than 0.4 of the parameters (about 1 − 0.6²).
    channel_costs = UnitCosts(channels_alone.model, channels_alone.dependencies)
    assert channel_costs.removed_fraction(removed_units(channels_alone.dependencies), "params") > 0.45


def test_parameter_target_on_a_resnet_is_met_after_compaction():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    dense = pk.summary(model, x)
    pk.prune(
        model, 0.5, criterion="l2", granularity="out_channel", scope="global", example_inputs=x, sparsity_in="params"
    )
    small = pk.compact(model, x)
    saved = 1 - pk.summary(small, x).total_params / dense.total_params
    assert 0.5 <= saved < 0.51


def _attention_model():
    torch.manual_seed(0)
    return TinyAttention(heads=4, kv_heads=4).eval(), torch.randn(1, 5, 16)


@pytest.mark.parametrize("only", ["heads", "width"])
def test_heads_only_and_width_only(only):
    model, x = _attention_model()
    pruner = pk.prune(model, 0.5, granularity="out_channel", example_inputs=x, prune_only=only)
    assert int(pruner.dependencies.unit_is_head.sum()) == 4
    small = pk.compact(model, x)
    if only == "heads":
        assert (small.q.out_features, small.o.in_features, small.up.out_features) == (8, 8, 32)
    else:
        assert (small.q.out_features, small.o.in_features, small.up.out_features) == (16, 16, 16)


def test_heads_only_with_a_parameter_target():
    model, x = _attention_model()
    dense = _params(model)
    pk.prune(model, 0.2, granularity="out_channel", example_inputs=x, prune_only="heads", sparsity_in="params")
    small = pk.compact(model, x)
    assert small.up.out_features == 32 and 1 - _params(small) / dense >= 0.2


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sparsity_in": "bytes"}, "unknown sparsity_in"),
        ({"prune_only": "mlp"}, "unknown prune_only"),
        ({"prune_only": "heads"}, "no attention heads"),
        ({"sparsity_in": "params", "granularity": "weight"}, "coupled structured pruning only"),
        ({"prune_only": "width", "coupled": False}, "coupled structured pruning only"),
    ],
)
def test_bad_targets_are_refused_before_the_model_changes(options, message):
    model = _randomize_norms(ResidualNet()).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 8, 8)
    options = {"granularity": "out_channel", "example_inputs": x, **options}
    with pytest.raises(ValueError, match=message):
        pk.prune(model, 0.5, **options)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(MASK_PREFIX in name for name, _ in model.named_buffers())


def test_the_summary_says_what_the_sparsity_counted():
    model = _randomize_norms(ResidualNet()).eval()
    x = torch.randn(1, 3, 8, 8)
    pruner = pk.prune(model, 0.3, granularity="out_channel", example_inputs=x, sparsity_in="macs")
    report = pruner.summary()
    assert "counts macs" in str(report) and "fewer parameters" in report.to_dict()["notes"][0]
    saved_macs = float(report.notes[0].split("parameters and ")[1].split("%")[0]) / 100
    small = pk.compact(model, x)
    after = pk.summary(small, x)
    assert saved_macs == pytest.approx(1 - after.macs / report.macs, abs=1e-3)
