"""Issue 10: a regression test per reliability defect owned here (7, 8, 10, 13) and one per kind of
module, parameter and argument a user may hand over (see :mod:`prunekit.checks` for the decisions).

A refused call raises the named error with a message naming the argument or layer, and leaves the
model bit for bit as it was: state_dict, all buffers, hooks, requires_grad and parametrizations."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as torch_prune
from torch import nn

import prunekit as pk

# ---------------------------------------------------------------------------- helpers


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def make_convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


X = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
IMAGES = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))


def _bits(tensor):
    """A tensor's bytes (NaN patterns included), for bit-for-bit comparison of any dtype (meta
    tensors have no bytes; quantized ones are compared through their integer representation)."""
    if tensor.device.type == "meta":
        return torch.empty(0, dtype=torch.uint8)
    if tensor.is_quantized:
        tensor = tensor.int_repr()
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.bool else flat


def snapshot(model):
    """Everything a failed call must leave alone."""
    hooks = []
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks.append((name, kind, tuple(getattr(module, kind).values())))
    return {
        "state": {
            k: (v.dtype, tuple(v.shape), _bits(v).clone()) if isinstance(v, torch.Tensor) else (repr(v), None, None)
            for k, v in model.state_dict().items()
        },
        "buffers": {k: _bits(v).clone() for k, v in model.named_buffers()},
        "hooks": hooks,
        "param_hooks": [(n, len(p._backward_hooks or {}), len(p._post_accumulate_grad_hooks or {})) for n, p in
                        model.named_parameters()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "parametrized": [n for n, m in model.named_modules() if parametrize.is_parametrized(m)],
        "training": [m.training for m in model.modules()],
    }  # fmt: skip


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, (dtype, shape, bits) in before["state"].items():
        assert after["state"][key][:2] == (dtype, shape), key
        assert bits is None or torch.equal(after["state"][key][2], bits), key
    assert after["buffers"].keys() == before["buffers"].keys()  # no mask buffer added
    for key, bits in before["buffers"].items():
        assert torch.equal(after["buffers"][key], bits), key
    for key in ("hooks", "param_hooks", "requires_grad", "parametrized", "training"):
        assert after[key] == before[key], key


def expect_refusal(model, call, exc, match):
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        call()
    assert_unchanged(model, before)


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


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


# ---------------------------------------------------------------------------- kinds of module and parameter


def _parametrized(model):
    parametrize.register_parametrization(model[2], "weight", nn.Identity())
    return model


REPARAMETRIZED = {
    "parametrize": (_parametrized, "2", "remove_parametrizations"),
    "weight_norm": (lambda m: (nn.utils.parametrizations.weight_norm(m[0]), m)[1], "0", "remove_parametrizations"),
    "spectral_norm": (lambda m: (nn.utils.parametrizations.spectral_norm(m[4]), m)[1], "4", "remove_parametrizations"),
    "legacy_spectral_norm": (lambda m: (nn.utils.spectral_norm(m[0]), m)[1], "0", "remove_spectral_norm"),
    "torch_prune": (lambda m: (torch_prune.l1_unstructured(m[2], "weight", 0.3), m)[1], "2", r"prune.remove"),
}


@pytest.mark.parametrize("kind", sorted(REPARAMETRIZED))
def test_reparametrized_weights_are_refused_naming_the_layer_and_the_fix(kind):
    make, layer, fix = REPARAMETRIZED[kind]
    model = make(make_mlp())
    expect_refusal(model, lambda: pk.prune(model, 0.5), ValueError, rf"layer '{layer}'.*{fix}")


def test_legacy_weight_norm_is_refused():
    model = make_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates it in favour of parametrizations
        nn.utils.weight_norm(model[2])
    expect_refusal(model, lambda: pk.prune(model, 0.5), ValueError, r"layer '2'.*remove_weight_norm")


def test_reparametrized_layer_left_out_by_include_is_fine():
    model = _parametrized(make_mlp())
    pruner = pk.prune(model, 0.5, include=["0", "4"])
    assert {t.name for t in pruner.targets} == {"0", "4"}


def test_quantized_layers_are_refused():
    model = torch.ao.quantization.quantize_dynamic(make_mlp(), {nn.Linear}, dtype=torch.qint8)
    expect_refusal(model, lambda: pk.prune(model, 0.5), ValueError, r"layer '0'.*quantized.*Prune the float model")


def test_fake_quant_layers_are_honoured():
    model = make_mlp()
    model.train()
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ao.quantization.prepare_qat(model, inplace=True)
        model(X)  # observers see the weights
        pruner = pk.prune(model, 0.5)
        model(X)
    for target in pruner.targets:
        layer = target.module
        keep = pruner.masks[target.full_name]
        assert int((~keep).sum()) == keep.numel() // 2
        assert bool((layer.weight_fake_quant(layer.weight)[~keep] == 0).all())  # zero survives fake-quant


@pytest.mark.parametrize(
    "wrap, match",
    [(nn.DataParallel, r"DataParallel.*model\.module"), (torch.compile, r"torch\.compile.*model\._orig_mod")],
)
def test_wrapped_and_compiled_models_are_refused(wrap, match):
    inner = make_mlp()
    model = wrap(inner)
    expect_refusal(model, lambda: pk.prune(model, 0.5), TypeError, match)


def test_tied_weights_stay_tied_and_count_once():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = model[0].weight
    pruner = pk.prune(model, 0.5)
    assert len(pruner.targets) == 1 and model[2].weight is model[0].weight
    assert int((model[0].weight == 0).sum()) == 32
    pruner.remove()
    assert model[2].weight is model[0].weight


def test_frozen_weights_are_pruned_and_stay_frozen():
    model = make_convnet()
    model[0].requires_grad_(False)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=IMAGES)
    small = pk.compact(model, IMAGES)
    assert not small[0].weight.requires_grad and not small[0].bias.requires_grad
    assert small[3].weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_prunes_the_exact_count_and_keeps_the_dtype(dtype):
    model = make_mlp().to(dtype)
    pk.prune(model, 0.5)
    for layer in (model[0], model[2], model[4]):
        assert layer.weight.dtype == dtype
        assert int((layer.weight == 0).sum()) == layer.weight.numel() // 2


def test_bfloat16_coupled_pruning_compacts_exactly():
    model = make_mlp().to(torch.bfloat16)
    x = X.to(torch.bfloat16)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x)
    masked = outputs(model, x)
    small = pk.compact(model, x)
    assert small[0].weight.dtype == torch.bfloat16 and small[0].out_features == 8
    torch.testing.assert_close(outputs(small, x), masked, atol=2e-2, rtol=2e-2)


def test_channels_last_is_kept_through_pruning_and_compaction():
    model = make_convnet().to(memory_format=torch.channels_last)
    x = IMAGES.to(memory_format=torch.channels_last)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x)
    assert model[3].weight.is_contiguous(memory_format=torch.channels_last)
    masked = outputs(model, x)
    small = pk.compact(model, x)
    assert small[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert small[3].weight.shape == (4, 4, 3, 3)
    torch.testing.assert_close(outputs(small, x), masked)


def test_a_second_pruner_keeps_the_first_ones_masks():
    model = make_mlp()
    first = pk.prune(model, 0.5)
    pruned_before = {name: ~keep for name, keep in first.masks.items()}
    second = pk.prune(model, 0.75)
    for name, pruned in pruned_before.items():
        assert not bool(second.masks[name][pruned].any())  # masks only grow
        assert int((~second.masks[name]).sum()) == round(0.75 * pruned.numel())


def test_pruner_state_survives_torch_save_of_the_model():
    model = make_mlp()
    pk.prune(model, 0.5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert pk.masked_parameters(loaded).keys() == pk.masked_parameters(model).keys()
    copy.deepcopy(loaded)  # masks are plain buffers


def test_a_parametrized_module_that_is_not_pruned_is_fine():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    parametrize.register_parametrization(model[1], "weight", nn.Identity())
    pruner = pk.prune(model, 0.5)
    assert {t.name for t in pruner.targets} == {"0", "2"}


def test_compact_refuses_a_wrapped_model():
    model = nn.DataParallel(make_mlp())
    expect_refusal(model, lambda: pk.compact(model, X), TypeError, r"DataParallel.*model\.module")
