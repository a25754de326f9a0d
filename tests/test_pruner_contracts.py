"""Regression tests for the pruner's promises (issue #10 defects 1, 2, 3, 4, 5, 6, 9): options are
honoured or refused, pruned weights stay pruned, saved states load whole or not at all."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, {
        n: p.requires_grad for n, p in model.named_parameters()
    }


def assert_same(model, before):
    state, grads = before
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not pk.masked_parameters(model)


# ---------------------------------------------------------------- defect 1: include= in coupled mode


def test_include_limits_coupled_pruning_to_the_included_layers_units():
    model = mlp()
    x = torch.randn(3, 8)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x, include=["2"])
    masks = pk.masked_parameters(model)
    # Only layer 2's neurons go: its rows and bias, and the columns of layer 4 that read them.
    assert set(masks) == {"2.weight", "2.bias", "4.weight"}
    assert int((~masks["2.weight"].all(dim=1)).sum()) == 8
    assert torch.equal(masks["4.weight"].all(dim=0), masks["2.weight"].all(dim=1))
    small = pk.compact(model, x)
    assert (small[0].out_features, small[2].out_features, small[4].in_features) == (16, 8, 8)


def test_include_on_a_residual_stream_keeps_channels_other_layers_write():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(6, 12)
            self.block = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 12))
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            h = self.stem(x)
            return self.head(h + self.block(h))

    torch.manual_seed(0)
    model, x = Residual(), torch.randn(4, 6)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x, include=["block"])
    masks = pk.masked_parameters(model)
    # The stream's 12 channels are also written by the stem (not included): only the inner 24 go.
    assert "stem.weight" not in masks and "head.weight" not in masks and "block.2.bias" not in masks
    assert int((~masks["block.0.weight"].all(dim=1)).sum()) == 12
    assert int((~masks["block.2.weight"].all(dim=0)).sum()) == 12  # the columns reading them


# ---------------------------------------------------------------- defect 2: optimizers


def test_step_keeps_weights_of_an_unattached_optimizer_pruned():
    model = mlp()
    first = torch.optim.SGD(model[0].parameters(), lr=0.5)
    second = torch.optim.SGD([p for m in (model[2], model[4]) for p in m.parameters()], lr=0.5)
    pruner = pk.prune(model, 0.8, optimizer=first)
    for _ in range(3):
        F.mse_loss(model(torch.randn(5, 8)), torch.randn(5, 4)).backward()
        first.step(), second.step(), first.zero_grad(), second.zero_grad()
        pruner.step()
    for name, keep in pruner.masks.items():
        weight = dict(model.named_parameters())[name]
        assert not bool(weight.detach()[~keep].any()), name


def test_several_optimizers_attach_and_a_fresh_one_replaces_the_old():
    model = mlp()
    pruner = pk.prune(model, 0.5)
    old = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach_optimizer(old)
    pruner.attach_optimizer(old)  # twice is once
    pruner.detach_optimizer(old)
    fresh = torch.optim.Adam(model.parameters(), lr=0.1)
    pruner.attach_optimizer(fresh)
    F.mse_loss(model(torch.randn(5, 8)), torch.randn(5, 4)).backward()
    fresh.step()
    for name, keep in pruner.masks.items():
        assert not bool(dict(model.named_parameters())[name].detach()[~keep].any()), name


def test_a_wrapped_optimizer_is_unwrapped():
    class Wrapper:  # as Accelerate's AcceleratedOptimizer keeps it
        def __init__(self, optimizer):
            self.optimizer = optimizer

    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    pruner = pk.prune(model, 0.5, optimizer=Wrapper(inner))
    assert pruner.enforcer.optimizers == [inner]


# ---------------------------------------------------------------- defect 3: frozen weights, gradient criteria


@pytest.mark.parametrize("criterion", ["gradient", "movement"])
def test_gradient_criteria_refuse_frozen_layers_without_data(criterion):
    model = mlp()
    model[2].weight.requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"requires_grad=False.*2\.weight"):
        pk.Pruner(model, 0.5, criterion=criterion)
    assert_same(model, before)


# ---------------------------------------------------------------- defect 4: exclude any module


def test_exclude_may_name_an_lstm_that_structured_pruning_leaves_whole():
    class WithLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(6, 12)
            self.fc = nn.Linear(12, 10)
            self.rnn = nn.LSTM(10, 5, batch_first=True)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.rnn(torch.relu(self.fc(torch.relu(self.inner(x)))))[0])

    torch.manual_seed(0)
    model, x = WithLSTM(), torch.randn(2, 3, 6)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x, exclude=["rnn"])
    small = pk.compact(model, x, exclude=["rnn"])
    assert small.fc.out_features == 10  # read by the excluded LSTM: kept
    assert small.inner.out_features == 6 and small.fc.in_features == 6
    with pytest.raises(ValueError, match="exclude entry 'rnm' matches no module"):
        pk.prune(WithLSTM(), 0.5, exclude=["rnm"])

    # pk.compact follows the pruner's exclude= when it is given none (and the model has not changed)
    torch.manual_seed(0)
    model = WithLSTM()
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x, exclude=["rnn"])
    inherited = pk.compact(model, x)
    assert inherited.fc.out_features == 10 and inherited.inner.out_features == 6
    assert torch.equal(inherited(x), small(x))
    # without the pruner's trace there is nothing to inherit: the LSTM must be named
    with pytest.raises(pk.structure.UnsupportedOperationError, match="rnn"):
        pk.compact(WithLSTM(), x)


# ---------------------------------------------------------------- defects 5 and 6: saved states


def saved(pruner):
    buffer = io.BytesIO()
    torch.save(pruner.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "options, field",
    [
        ({"sparsity": 0.5}, "sparsity"),
        ({"criterion": "random"}, "criterion"),
        ({"scope": "global"}, "scope"),
        ({"granularity": "kernel"}, "granularity"),
        ({"min_kept": 2}, "min_kept"),
        ({"layer_sparsity": {"0": 0.0}}, "layer_sparsity"),
    ],
)
def test_a_state_of_another_configuration_is_refused_naming_the_field(options, field):
    state = saved(pk.prune(mlp(), 0.9))
    model = mlp()
    config = {"sparsity": 0.9, **options}
    pruner = pk.Pruner(model, config.pop("sparsity"), **config)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"another configuration \({field}:"):
        pruner.load_state_dict(state)
    assert_same(model, before)
    pruner.load_state_dict(state, check_config=False)  # the explicit override
    assert pruner.masks


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda s: s.pop("step"), "no 'step'"),
        (lambda s: s.update(step=-3), "bad 'step'"),
        (lambda s: s.update(last_event="x"), "bad 'last_event'"),
        (lambda s: s.update(rewind_state={"nope": torch.zeros(1)}), "does not have"),
        (lambda s: s.update(criterion={"generator": torch.zeros(3, dtype=torch.uint8)}), "generator"),
    ],
)
def test_a_damaged_state_changes_nothing(damage, match):
    state = saved(pk.prune(mlp(), 0.5, criterion="random"))
    damage(state)
    model = mlp()
    pruner = pk.Pruner(model, 0.5, criterion="random")
    before = snapshot(model)
    generator = pruner.criterion.generator.get_state()
    with pytest.raises(ValueError, match=match):
        pruner.load_state_dict(state)
    assert_same(model, before)
    assert pruner.step_count == 0 and torch.equal(pruner.criterion.generator.get_state(), generator)


# ---------------------------------------------------------------- defect 9: N:M sparsity


@pytest.mark.parametrize("sparsity, error", [(float("nan"), ValueError), ("0.5", TypeError), (0.3, ValueError)])
def test_nm_checks_the_sparsity_it_is_given(sparsity, error):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(error, match="sparsity"):
        pk.prune(model, sparsity, granularity=pk.NM(2, 4))
    assert_same(model, before)
    pk.prune(model, 0.5, granularity=pk.NM(2, 4))  # repeating the fixed sparsity is fine


# ---------------------------------------------------------------- options that do not apply


@pytest.mark.parametrize("option", [{"round_to": 8}, {"max_layer_sparsity": 0.5}, {"prune_outputs": True}])
def test_structured_options_outside_coupled_mode_are_refused(option):
    model = mlp()
    with pytest.raises(ValueError, match=f"{next(iter(option))}=.* apply to coupled structured pruning only"):
        pk.prune(model, 0.5, **option)


def test_seed_is_refused_by_criteria_that_take_none():
    with pytest.raises(ValueError, match="seeds the 'random' criterion only"):
        pk.prune(mlp(), 0.5, criterion="magnitude", seed=3)
    with pytest.raises(ValueError, match="does not use data="):
        pk.prune(mlp(), 0.5, criterion="magnitude", data=[], loss_fn=F.mse_loss)


def test_calibration_needs_a_criterion_that_reads_it():
    with pytest.raises(ValueError, match="does not read calibration data"):
        pk.prune(mlp(), 0.5, calibration=[torch.randn(2, 8)])


def test_row_scope_prunes_every_output_row_equally():
    model = mlp()
    pk.prune(model, 0.5, scope="row")
    for name, keep in pk.masked_parameters(model).items():
        assert (keep.sum(dim=1) == keep.shape[1] // 2).all(), name


def test_a_copy_of_the_model_is_refused_by_deepcopy_of_the_pruner():
    pruner = pk.prune(mlp(), 0.5)
    with pytest.raises(TypeError, match="deepcopy the model"):
        copy.deepcopy(pruner)


def test_compaction_zeroes_masked_weights_of_kept_units_too():
    model = mlp()
    x = torch.randn(3, 8)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x)
    with pytest.warns(UserWarning, match="already"):  # a second pruner on the same parameters
        pk.prune(model, 0.8)  # unstructured masks beside the removed units
    with torch.no_grad():
        model[0].weight.add_(1.0)  # stale: the masked entries are no longer zero
    kept_rows = pk.masked_parameters(model)["0.weight"].any(dim=1)
    keep = pk.masked_parameters(model)["0.weight"][kept_rows]
    with pytest.raises(pk.CompactionError):  # the masked model computes with the stale values...
        pk.compact(model, x)
    small = pk.compact(model, x, check=False)
    assert not bool(small[0].weight.detach()[~keep].any())  # ...the compacted one has zeros there


def test_count_kept_reads_the_packed_bits():
    from prunekit.core.masks import count_kept, pack_mask

    for numel in (1, 7, 8, 9, 1000):
        keep = torch.rand(numel) < 0.3
        assert count_kept(pack_mask(keep)) == int(keep.sum())


def test_compact_refuses_an_exclude_entry_that_matches_nothing():
    model = mlp()
    x = torch.randn(3, 8)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x)
    with pytest.raises(ValueError, match="exclude entry 'nope' matches no module"):
        pk.compact(model, x, exclude=["nope"])
