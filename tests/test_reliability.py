"""Issue 10: a regression test per reliability defect owned here (7, 8, 10, 13), and the options and
fallbacks that must not be silently ignored (see :mod:`prunekit.checks`; the kinds of module and
parameter are in test_module_kinds.py).

A refused call raises the named error with a message naming the argument or layer, and leaves the
model bit for bit as it was: state_dict, all buffers, hooks, requires_grad and parametrizations."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from model_state import IMAGES, X, assert_unchanged, expect_refusal, make_convnet, make_mlp, outputs, snapshot
from torch import nn

import prunekit as pk

# ---------------------------------------------------------------------------- defect 7: NaN / inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_bias_is_refused_coupled_and_uncoupled(bad):
    for options in (
        {"granularity": "out_channel", "example_inputs": X},
        {"granularity": "out_channel", "coupled": False},
    ):
        model = make_mlp()
        with torch.no_grad():
            model[0].bias[3] = bad
        expect_refusal(
            model, lambda m=model, o=options: pk.prune(m, 0.5, **o), ValueError, r"layer '0'.*NaN or inf.*'bias'"
        )


@pytest.mark.parametrize("tensor", ["weight", "bias", "running_var", "running_mean"])
def test_nan_in_norm_parameters_and_statistics_is_refused(tensor):
    model = make_convnet()
    with torch.no_grad():
        getattr(model[1], tensor)[2] = float("nan")
    expect_refusal(
        model,
        lambda: pk.prune(model, 0.5, granularity="out_channel", example_inputs=IMAGES),
        ValueError,
        rf"layer '1'.*NaN or inf.*'{tensor}'",
    )


def test_compact_check_is_nan_aware():
    model = make_mlp()
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=X)
    with torch.no_grad():
        kept = int(torch.nonzero(model[0].weight.abs().sum(1)).reshape(-1)[0])
        model[0].bias[kept] = float("nan")  # after pruning, so pk.prune could not refuse it
    before = snapshot(model)
    with pytest.raises(pk.CompactionError, match="output 0 of the masked model has NaN or inf"):
        pk.compact(model, X)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------- defect 8: tolerance


@pytest.mark.parametrize(
    "tolerance, exc",
    [
        (float("nan"), ValueError),
        (-1.0, ValueError),
        (float("inf"), ValueError),
        ("1e-4", TypeError),
        (True, TypeError),
    ],
)
def test_compact_tolerance_is_validated(tolerance, exc):
    model = make_mlp()
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=X)
    expect_refusal(model, lambda: pk.compact(model, X, tolerance=tolerance), exc, "tolerance")


def test_compact_tolerance_one_is_accepted():
    model = make_mlp()
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=X)
    assert pk.compact(model, X, tolerance=1)[0].out_features == 8


# ---------------------------------------------------------------------------- defect 10: shared parameters


class SharedWeights(nn.Module):
    """Two Linear layers sharing one weight Parameter (their biases differ), concatenated."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(32, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], 1))


def test_shared_parameter_is_compacted_in_every_owner(tmp_path):
    model = SharedWeights()
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=X)
    masked = outputs(model, X)
    small = pk.compact(model, X)
    assert small.a.weight is small.b.weight  # still tied
    assert small.a.weight.shape == (8, 8) and small.b.bias.shape == (8,) and small.c.weight.shape == (4, 16)
    torch.testing.assert_close(outputs(small, X), masked)
    # the plan re-ties the fresh model's shared weight too
    pk.save_pruned(small, tmp_path / "m.pt")
    loaded = pk.load_pruned(SharedWeights(), tmp_path / "m.pt")
    assert loaded.a.weight is loaded.b.weight
    torch.testing.assert_close(outputs(loaded, X), masked)


def test_plan_slicing_one_shared_tensor_two_ways_is_refused():
    model = SharedWeights()
    plan = {"format": "prunekit-plan/1", "kept": {"a.weight": {"0": [0, 1]}, "b.weight": {"0": [2, 3]}}}
    expect_refusal(model, lambda: pk.apply_plan(model, plan), ValueError, "shared tensor 'a.weight'")


# ---------------------------------------------------------------------------- defect 13: messages


def test_include_that_is_not_a_list_says_what_it_takes():
    model = make_mlp()
    expect_refusal(model, lambda: pk.prune(model, 0.5, include=3), TypeError, r"include takes .*got 3 of type int")


def test_layer_sparsity_key_that_is_not_a_pattern():
    model = make_mlp()
    expect_refusal(
        model, lambda: pk.prune(model, 0.5, layer_sparsity={1: 0.5}), TypeError, r"layer_sparsity keys .*\{'1': 0.5\}"
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rounds": 0}, "rounds must be a positive"),
        ({"rounds": 2.5}, "rounds must be a positive"),
        ({"every": 0}, "every must be a positive"),
        ({"start": -1}, "start must be ≥ 0"),
    ],
)
def test_per_round_names_the_argument(kwargs, match):
    arguments = {"fraction": 0.2, "rounds": 3, "start": 0, "every": 10, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        pk.Iterative.per_round(**arguments)


@pytest.mark.parametrize("epochs", [float("nan"), float("inf"), "2"])
def test_epochs_to_steps_refuses_non_finite_epochs(epochs):
    with pytest.raises(ValueError, match="epochs must be a finite number"):
        pk.epochs_to_steps(epochs, 10)


def test_epochs_to_steps_refuses_fractional_steps_per_epoch():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        pk.epochs_to_steps(1, 2.5)


@pytest.mark.parametrize("options", [{}, {"granularity": "out_channel", "example_inputs": X.to("meta")}])
def test_meta_device_is_refused_with_advice(options):
    model = make_mlp().to("meta")
    expect_refusal(model, lambda: pk.prune(model, 0.5, **options), ValueError, "meta device.*to_empty")


# ---------------------------------------------------------------------------- nothing silently ignored


def test_out_channel_without_example_inputs_warns():
    model = make_mlp()
    with pytest.warns(UserWarning, match="example_inputs=.*coupled=False"):
        pk.prune(model, 0.5, granularity="out_channel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pk.prune(make_mlp(), 0.5, granularity="out_channel", coupled=False)


def test_compact_of_unstructured_pruning_warns_that_nothing_was_removed():
    model = make_mlp()
    pk.prune(model, 0.5)
    with pytest.warns(UserWarning, match="removed nothing.*single weights.*granularity='out_channel'"):
        small = pk.compact(model, X)
    assert [p.shape for p in small.parameters()] == [p.shape for p in model.parameters()]
    with pytest.warns(UserWarning, match="removed nothing: no channel"):
        pk.compact(make_mlp(), X)


class WithUnusedPooler(nn.Module):
    """An encoder whose pooler runs but whose output the model discards (and a layer that never runs)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder, self.head = nn.Linear(8, 16), nn.Linear(16, 4)
        self.pooler, self.never = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        hidden = F.relu(self.encoder(x))
        self.pooler(hidden)  # computed and dropped, as by a model returning only its hidden states
        return self.head(hidden)


def test_layers_no_output_depends_on_are_reported():
    model = WithUnusedPooler()
    with pytest.warns(UserWarning, match=r"\['pooler', 'never'\] affect none of the model's outputs"):
        pk.prune(model, 0.5, granularity="out_channel", example_inputs=X)
    assert all(p.requires_grad for p in model.parameters())  # the check's temporary flags are restored


def test_no_unreached_warning_for_a_plain_model_with_frozen_layers():
    model = make_mlp()
    model[0].requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pk.prune(model, 0.5, granularity="out_channel", example_inputs=X)
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad


@pytest.mark.parametrize(
    "options, match",
    [
        ({"round_to": 8}, "round_to=8"),
        ({"max_layer_sparsity": 0.5}, "max_layer_sparsity=0.5"),
        ({"prune_outputs": True}, "prune_outputs=True"),
        ({"granularity": "out_channel", "coupled": False, "round_to": 4}, "round_to=4"),
        ({"granularity": "out_channel", "round_to": 4}, "round_to=4"),  # no example_inputs: not coupled
    ],
)
def test_coupled_only_options_outside_coupled_mode_are_refused(options, match):
    model = make_mlp()
    expect_refusal(model, lambda: pk.Pruner(model, 0.5, **options), ValueError, match + ".*coupled structured pruning")


@pytest.mark.parametrize("granularity", ["weight", "kernel", "in_channel"])
def test_coupled_false_with_another_granularity_is_refused(granularity):
    model = make_mlp()
    expect_refusal(
        model, lambda: pk.Pruner(model, 0.5, granularity=granularity, coupled=False), ValueError, "coupled=False"
    )


def test_coupled_must_be_a_bool():
    model = make_mlp()
    expect_refusal(model, lambda: pk.Pruner(model, 0.5, granularity="out_channel", coupled="no"), TypeError, "coupled")


@pytest.mark.parametrize(
    "options, exc, match",
    [
        ({"seed": 5}, ValueError, r"seed=5 seeds the 'random' criterion only"),
        ({"seed": "1"}, TypeError, "seed must be a whole number"),
        ({"mask_gradients": "no"}, TypeError, "mask_gradients must be True or False"),
        ({"granularity": "out_channel", "example_inputs": X, "prune_outputs": "no"}, TypeError, "prune_outputs"),
    ],
)
def test_options_that_would_be_ignored_or_misread_are_refused(options, exc, match):
    model = make_mlp()
    expect_refusal(model, lambda: pk.prune(model, 0.5, **options), exc, match)


def test_seed_with_the_random_criterion_is_honoured():
    masks = [pk.prune(make_mlp(), 0.5, criterion="random", seed=seed).masks["0.weight"] for seed in (3, 3, 4)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("flag", ["inplace", "check", "prune_outputs"])
def test_compact_flags_must_be_bools(flag):
    model = make_mlp()
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=X)
    expect_refusal(model, lambda: pk.compact(model, X, **{flag: "no"}), TypeError, f"{flag} must be True or False")


def test_compact_refuses_a_plan_that_empties_a_layer():
    model = make_mlp()
    pk.prune(model, 0.97, granularity="out_channel", example_inputs=X, scope="local", min_kept=0)  # 16 of 16
    before = snapshot(model)
    with pytest.raises(pk.CompactionError, match=r"of '0\.(weight|bias)'.*module '0' with no channels.*min_kept"):
        pk.compact(model, X)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "model, x, match",
    [
        (nn.Sequential(nn.Linear(8, 4)), torch.randn(2, 8), "reaches a model output"),
        (
            nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(), nn.Conv2d(8, 2, 1)),
            torch.randn(2, 3, 6, 6),
            "affine=False",
        ),
    ],
)
def test_coupled_pruning_of_a_model_with_no_removable_unit_is_refused(model, x, match):
    expect_refusal(model, lambda: pk.prune(model, 0.5, granularity="out_channel", example_inputs=x), ValueError, match)
    pk.prune(model, 0.0, granularity="out_channel", example_inputs=x)  # nothing asked, nothing refused
