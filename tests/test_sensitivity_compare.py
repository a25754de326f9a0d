"""pk.sensitivity (each layer pruned alone at each sparsity, the model restored, layer_sparsity proposed)
and pk.compare (dense and pruned side by side)."""

import re

import pytest
import torch
from torch import nn

import prunekit as pk


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_each_layer_is_pruned_alone_and_the_model_is_restored():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def evaluate(m):  # the metric is the number of zero weights in each layer: we see who was pruned
        seen.append((int((m[0].weight == 0).sum()), int((m[2].weight == 0).sum())))
        return float(len(seen))

    result = pk.sensitivity(model, evaluate, sparsities=[0.25, 0.5])
    # dense first, then layer 0 at 25% (8 of 32) and 50% (16), then layer 2 at 25% (4 of 16) and 50% (8)
    assert seen == [(0, 0), (8, 0), (16, 0), (0, 4), (0, 8)]
    assert result.baseline == 1.0 and result.metrics == {"0": [2.0, 3.0], "2": [4.0, 5.0]}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())


def test_the_proposal_keeps_each_layer_within_the_allowed_drop():
    result = pk.Sensitivity(
        0.9, [0.25, 0.5, 0.75], {"a": [0.9, 0.89, 0.5], "b": [0.7, 0.9, 0.9], "c.d": [0.9, 0.9, 0.88]}
    )
    assert result.propose(0.025) == {"a": 0.5, "b": 0.0, re.escape("c.d"): 0.75}
    loss = pk.Sensitivity(1.0, [0.5], {"a": [1.05]}, higher_is_better=False)
    assert loss.propose(0.1) == {"a": 0.5} and loss.propose(0.01) == {"a": 0.0}
    with pytest.raises(ValueError, match="max_drop"):
        result.propose(-1)
    assert "dense metric 0.9" in str(result)


def test_a_proposal_is_a_layer_sparsity_the_pruner_takes():
    model = make_model()
    x = torch.randn(16, 4)
    reference = model(x).detach()

    def agreement(m):
        return float((m(x).argmax(1) == reference.argmax(1)).float().mean())

    result = pk.sensitivity(model, agreement, sparsities=[0.25, 0.5, 0.75])
    proposal = result.propose(0.1)
    pk.prune(model, 0.0, layer_sparsity=proposal)
    for name, sparsity in proposal.items():
        layer = model.get_submodule(name.replace("\\", ""))
        assert float((layer.weight == 0).float().mean()) == pytest.approx(sparsity, abs=0.05)


def test_bad_sensitivity_arguments():
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        pk.sensitivity(make_model(), lambda m: 0.0, sparsities=[90])
    with pytest.raises(TypeError, match="scope= does not apply"):
        pk.sensitivity(make_model(), lambda m: 0.0, scope="global")


def test_compare_counts_both_models_side_by_side():
    dense = make_model()
    x = torch.randn(3, 4)
    pruned = make_model()
    pk.prune(pruned, 0.5, granularity="out_channel", example_inputs=x)
    small = pk.compact(pruned, x)
    report = pk.compare(dense, small, example_inputs=x, rounds=2, repeats=2)
    assert report.value("parameters") == (4 * 8 + 8 + 8 * 2 + 2, 4 * 4 + 4 + 4 * 2 + 2)
    assert report.value("MACs") == (3 * (4 * 8 + 8 * 2), 3 * (4 * 4 + 4 * 2))
    dense_bytes, small_bytes = report.value("file size")
    assert small_bytes < dense_bytes
    assert all(ms > 0 for ms in report.value("latency"))
    assert "pruned/dense" in str(report) and "latency (ms)" in str(report)


def test_unit_sparsity_counts_units_where_sparsity_counts_weights():
    model = make_model()  # Linear(4, 8): 8 rows of 4 weights; Linear(8, 2): 2 rows of 8
    pruner = pk.prune(model, 0.5, granularity="out_channel", layer_sparsity={"0": 0.5, "2": 0.0})
    assert pruner.unit_sparsity == pytest.approx(4 / 10)  # 4 of the 10 rows
    assert pruner.sparsity == pytest.approx(16 / 48)  # their 16 of the 48 weights
    blocks = pk.prune(make_model(), 0.5, granularity=pk.Block(2, 2), layer_sparsity={"2": 0.0})
    assert blocks.unit_sparsity == pytest.approx(4 / (8 + 4))  # 4 of layer 0's 8 blocks, none of layer 2's 4
    coupled = pk.prune(make_model(), 0.5, granularity="out_channel", example_inputs=torch.randn(2, 4))
    assert coupled.unit_sparsity == 0.5  # 4 of the 8 hidden channels
    nm = pk.prune(make_model(), granularity=pk.NM(2, 4))  # a unit of N:M is one weight
    assert nm.unit_sparsity == nm.sparsity == 0.5


def test_summary_groups_rows_by_module_depth():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 2))
    pk.prune(model, 0.5)
    x = torch.randn(3, 4)
    full, grouped = pk.summary(model, x), pk.summary(model, x, max_depth=1)
    assert [row.name for row in full.layers] == ["0.0", "0.2", "1"]
    assert [(row.name, row.kind) for row in grouped.layers] == [("0", "Sequential"), ("1", "Linear")]
    first = grouped.layers[0]
    assert (first.params, first.nonzero_params) == (4 * 8 + 8 + 8 * 8 + 8, 16 + 8 + 32 + 8)
    assert first.macs == 3 * (4 * 8 + 8 * 8)
    assert (grouped.total_params, grouped.macs, grouped.nonzero_macs) == (
        full.total_params,
        full.macs,
        full.nonzero_macs,
    )
    assert [row.name for row in pk.summary(model, x, max_depth=2).layers] == ["0.0", "0.2", "1"]
    with pytest.raises(ValueError, match="max_depth"):
        pk.summary(model, max_depth=0)
