"""Every bad input raises the right error with a helpful message, and leaves the model unchanged:
same state_dict, no mask buffers, no hooks, and training behaves exactly as on an untouched copy."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk

# ---------------------------------------------------------------------------- helpers


class Net(nn.Module):
    """Conv2d(3, 4, 3) → ReLU → Flatten → Linear(64, 8) → Tanh → Linear(8, 3); takes (N, 3, 6, 6).

    Layers: conv, fc1, fc2."""

    def __init__(self, hidden=8):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(4 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(F.relu(self.conv(x)).flatten(1))))


def make_net(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Net(**kwargs)


def make_mlp(in_features=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, 8), nn.Tanh(), nn.Linear(8, 4))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    """Bit-for-bit equality, NaN included."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


def example_input(model):
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if first is None:
        return None
    g = torch.Generator().manual_seed(5)
    if isinstance(first, nn.Conv2d):
        return torch.randn(4, first.in_channels, 6, 6, generator=g)
    return torch.randn(4, first.in_features, generator=g)


def has_hooks(model):
    for param in model.parameters():
        if param._post_accumulate_grad_hooks or param._backward_hooks:
            return True
    for module in model.modules():
        for hooks in (
            module._forward_hooks,
            module._forward_pre_hooks,
            module._backward_hooks,
            module._backward_pre_hooks,
        ):
            if hooks:
                return True
    return False


def assert_unchanged(model, before, reference, *, allow_hooks=False):
    """``model`` has the state ``before``, no masks, no hooks, and trains exactly like ``reference``
    (a deep copy taken before the failed call)."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        assert same(after[key], before[key]), key
    assert pk.masked_parameters(model) == {}
    assert not any(name.startswith("_pk_mask_") for module in model.modules() for name in module._buffers)
    if not allow_hooks:
        assert not has_hooks(model)
    params = list(model.parameters())
    if not params:
        return
    x = example_input(model)
    if x is None:
        return
    start = [p.detach().clone() for p in params]
    results = []
    for m in (model, reference):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        optimizer.zero_grad()
        m(x).square().mean().backward()
        grads = [p.grad.clone() for p in m.parameters()]
        optimizer.step()
        results.append((grads, [p.detach().clone() for p in m.parameters()]))
    (grads_a, params_a), (grads_b, params_b) = results
    for ga, gb in zip(grads_a, grads_b):
        assert same(ga, gb)
    for pa, pb in zip(params_a, params_b):
        assert same(pa, pb)
    # a training step changes the weights normally
    if all(torch.isfinite(p).all() for p in start):
        assert all(not torch.equal(a, b) for a, b in zip(start, params_a))


def expect_failure(model, call, exc, match, **kwargs):
    before, reference = snapshot(model), copy.deepcopy(model)
    with pytest.raises(exc, match=match):
        call()
    assert_unchanged(model, before, reference, **kwargs)


ENTRY_POINTS = {
    "prune": lambda model, *args, **kwargs: pk.prune(model, *args, **kwargs),
    "Pruner": lambda model, *args, **kwargs: pk.Pruner(model, *args, **kwargs),
}


# ---------------------------------------------------------------------------- sparsity


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("sparsity", "exc", "match"),
    [
        (-0.1, ValueError, r"\[0, 1\).*-0\.1"),
        (1.0, ValueError, r"\[0, 1\).*1\.0"),
        (1.5, ValueError, r"\[0, 1\)"),
        (90, ValueError, r"fraction.*0\.9"),
        (float("nan"), ValueError, r"\[0, 1\)"),
        ("0.5", TypeError, r"number.*'0\.5'"),
        (None, TypeError, r"sparsity is required"),
        (True, TypeError, r"number"),
    ],
)
def test_bad_sparsity(entry, sparsity, exc, match):
    model = make_net()
    expect_failure(model, lambda: ENTRY_POINTS[entry](model, sparsity), exc, match)


def test_bad_sparsity_in_prune_call_leaves_model_unchanged():
    model = make_net()
    pruner = pk.Pruner(model, 0.5, schedule=pk.OneShot(at=10))
    before, reference = snapshot(model), copy.deepcopy(model)
    with pytest.raises(ValueError, match="fraction"):
        pruner.prune(50)
    with pytest.raises(TypeError, match="number"):
        pruner.prune("0.5")
    assert_unchanged(model, before, reference, allow_hooks=True)


def test_bad_layer_sparsity_value():
    model = make_net()
    expect_failure(
        model,
        lambda: pk.prune(model, 0.5, layer_sparsity={"fc1": 80}),
        ValueError,
        r"layer_sparsity\['fc1'\].*80.*fraction.*0\.9",
    )


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_unknown_criterion_lists_valid_names(entry):
    model = make_net()
    before, reference = snapshot(model), copy.deepcopy(model)
    with pytest.raises(ValueError, match="unknown criterion 'magnitud'") as info:
        ENTRY_POINTS[entry](model, 0.5, criterion="magnitud")
    for name in ("magnitude", "l2", "gradient", "movement", "random"):
        assert repr(name) in str(info.value)
    assert_unchanged(model, before, reference)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_unknown_granularity_lists_valid_names(entry):
    model = make_net()
    before, reference = snapshot(model), copy.deepcopy(model)
    with pytest.raises(ValueError, match="unknown granularity 'channel'") as info:
        ENTRY_POINTS[entry](model, 0.5, granularity="channel")
    for name in ("weight", "kernel", "out_channel", "in_channel"):
        assert repr(name) in str(info.value)
    assert "NM" in str(info.value) and "Block" in str(info.value)
    assert_unchanged(model, before, reference)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_unknown_scope_lists_valid_names(entry):
    model = make_net()
    before, reference = snapshot(model), copy.deepcopy(model)
    with pytest.raises(ValueError, match="unknown scope 'globl'") as info:
        ENTRY_POINTS[entry](model, 0.5, scope="globl")
    assert "'local'" in str(info.value) and "'global'" in str(info.value)
    assert_unchanged(model, before, reference)


def test_bad_criterion_and_granularity_types():
    model = make_net()
    expect_failure(model, lambda: pk.prune(model, 0.5, criterion=3), TypeError, "criterion")
    expect_failure(model, lambda: pk.prune(model, 0.5, granularity=2), TypeError, "granularity")


def test_schedule_in_prune_is_a_type_error():
    model = make_net()
    expect_failure(model, lambda: pk.prune(model, 0.5, schedule=pk.OneShot(at=0)), TypeError, "pk.Pruner")


def test_schedule_of_wrong_type():
    model = make_net()
    expect_failure(model, lambda: pk.Pruner(model, 0.5, schedule="gradual"), TypeError, "schedule")


# ---------------------------------------------------------------------------- structure


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_nm_on_layer_whose_input_dim_is_not_a_multiple_of_m(entry):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
    expect_failure(
        model, lambda: ENTRY_POINTS[entry](model, granularity=pk.NM(2, 4)), ValueError, r"NM\(2, 4\).*'2'.*\(6\).*m=4"
    )


def test_nothing_to_prune():
    model = nn.Sequential(nn.ReLU())
    expect_failure(model, lambda: pk.prune(model, 0.5), ValueError, "nothing to prune")
    model = nn.Sequential(nn.BatchNorm1d(4), nn.LayerNorm(4))
    expect_failure(model, lambda: pk.prune(model, 0.5), ValueError, "nothing to prune")


def test_everything_excluded():
    model = make_net()
    expect_failure(model, lambda: pk.prune(model, 0.5, exclude=[nn.Linear, nn.Conv2d]), ValueError, "nothing to prune")


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_include_pattern_matching_nothing(entry):
    model = make_net()
    expect_failure(
        model,
        lambda: ENTRY_POINTS[entry](model, 0.5, include="encoder"),
        ValueError,
        r"include entry 'encoder' matches no prunable layer.*conv, fc1, fc2",
    )


def test_include_pattern_prefix_is_not_enough():
    """``fc`` must not match ``fc1`` (patterns match whole names), so it matches nothing."""
    model = make_net()
    expect_failure(model, lambda: pk.prune(model, 0.5, include="fc"), ValueError, "include entry 'fc'")


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_exclude_type_matching_nothing(entry):
    model = make_mlp()
    expect_failure(
        model,
        lambda: ENTRY_POINTS[entry](model, 0.5, exclude=nn.Conv2d),
        ValueError,
        "exclude entry Conv2d matches no module",
    )


def test_bad_include_entries():
    model = make_net()
    expect_failure(model, lambda: pk.prune(model, 0.5, include=[3]), TypeError, "include")
    expect_failure(model, lambda: pk.prune(model, 0.5, exclude="fc[1"), ValueError, "regular expression")


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_layer_sparsity_pattern_matching_nothing(entry):
    model = make_net()
    expect_failure(
        model,
        lambda: ENTRY_POINTS[entry](model, 0.5, layer_sparsity={"decoder": 0.3}),
        ValueError,
        r"layer_sparsity pattern 'decoder' matches no pruned layer.*conv, fc1, fc2",
    )


def test_layer_sparsity_pattern_on_excluded_layer_matches_nothing():
    model = make_net()
    expect_failure(
        model,
        lambda: pk.prune(model, 0.5, exclude="conv", layer_sparsity={"conv": 0.3}),
        ValueError,
        "layer_sparsity pattern 'conv'",
    )


# ---------------------------------------------------------------------------- bad weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_non_finite_weight_names_the_layer(bad, scope):
    model = make_net()
    with torch.no_grad():
        model.fc1.weight[2, 3] = bad
    expect_failure(model, lambda: pk.prune(model, 0.5, scope=scope), ValueError, r"'fc1'.*NaN or inf")


def test_non_finite_weight_in_pruner_prune_leaves_weights_and_masks_alone():
    model = make_net()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    pruner = pk.Pruner(model, 0.5)
    before, reference = snapshot(model), copy.deepcopy(model)
    with pytest.raises(ValueError, match="'fc2'"):
        pruner.prune()
    assert_unchanged(model, before, reference, allow_hooks=True)


# ---------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("make_schedule", "match"),
    [
        (lambda: pk.Gradual(start=10, end=5), r"end=5.*start=10"),
        (lambda: pk.Iterative(start=10, end=5, rounds=2), r"end=5.*start=10"),
        (lambda: pk.Gradual(start=0, end=10, every=0), "every"),
        (lambda: pk.Gradual(start=-1, end=10), "start"),
        (lambda: pk.OneShot(at=-1), "at"),
        (lambda: pk.Iterative(start=0, end=10, rounds=0), "rounds"),
        (lambda: pk.Gradual(start=0, end=10, curve="quadratic"), "'cubic'"),
    ],
)
def test_bad_schedule(make_schedule, match):
    with pytest.raises(ValueError, match=match):
        make_schedule()


def test_schedule_initial_above_final_sparsity():
    model = make_net()
    expect_failure(
        model,
        lambda: pk.Pruner(model, 0.3, schedule=pk.Gradual(start=0, end=10, initial=0.5)),
        ValueError,
        "above the final sparsity",
    )


# ---------------------------------------------------------------------------- criteria


def batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]


def test_gradient_criterion_without_data():
    model = make_net()
    expect_failure(model, lambda: pk.prune(model, 0.5, criterion="gradient"), ValueError, "data=")
    expect_failure(model, lambda: pk.prune(model, 0.5, criterion="movement"), ValueError, "data=")


def test_gradient_criterion_with_data_but_no_loss():
    model = make_net()
    expect_failure(model, lambda: pk.prune(model, 0.5, criterion="gradient", data=batches()), ValueError, "loss_fn")


def test_data_with_a_criterion_that_does_not_use_it():
    model = make_net()
    expect_failure(
        model,
        lambda: pk.prune(model, 0.5, criterion="magnitude", data=batches(), loss_fn=F.cross_entropy),
        ValueError,
        "does not use data=",
    )


def test_custom_criterion_wrong_shape():
    model = make_net()

    def flat_scores(weight, module):
        return weight.abs().reshape(-1)

    expect_failure(
        model, lambda: pk.prune(model, 0.5, criterion=flat_scores), ValueError, r"flat_scores.*shape.*conv\.weight"
    )


def test_custom_criterion_not_a_tensor():
    model = make_net()
    expect_failure(model, lambda: pk.prune(model, 0.5, criterion=lambda w: 1.0), TypeError, "must return a tensor")


def test_custom_criterion_nan_scores():
    model = make_net()
    expect_failure(
        model, lambda: pk.prune(model, 0.5, criterion=lambda w: torch.full_like(w, float("nan"))), ValueError, "NaN"
    )


class Boom(Exception):
    pass


@pytest.mark.parametrize("scope", ["global", "local"])
def test_custom_criterion_raising_midway_leaves_model_unchanged(scope):
    model = make_net()
    scored = []

    def explodes_on_last_layer(weight, module):
        scored.append(module)
        if module is model.fc2:
            raise Boom("criterion failed on fc2")
        return weight.abs()

    expect_failure(model, lambda: pk.prune(model, 0.9, scope=scope, criterion=explodes_on_last_layer), Boom, "fc2")
    assert model.conv in scored and model.fc1 in scored  # earlier layers were scored before the failure


def test_failed_prune_keeps_masks_of_an_earlier_prune():
    """A failing pk.prune on a model that already holds masks leaves those masks (and weights) as they were."""
    model = make_net()
    first = pk.prune(model, 0.5)  # a live pruner with masks on the model
    masks = {k: v.clone() for k, v in pk.masked_parameters(model).items()}
    before = snapshot(model)

    def fails(weight):
        raise Boom("no scores today")

    with pytest.raises(Boom):
        pk.prune(model, 0.8, criterion=fails)
    after = pk.masked_parameters(model)
    assert after.keys() == masks.keys()
    assert all(torch.equal(after[k], masks[k]) for k in masks)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    first.step()  # the first pruner still works


# ---------------------------------------------------------------------------- other arguments


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("not_a_model", [[nn.Linear(2, 2)], {"w": torch.ones(2, 2)}, torch.ones(2, 2), None])
def test_non_module_model(entry, not_a_model):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ENTRY_POINTS[entry](not_a_model, 0.5)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("sparsity", [0.7, 0.25, 0.0])
def test_nm_with_a_different_sparsity(entry, sparsity):
    model = make_mlp()
    expect_failure(
        model,
        lambda: ENTRY_POINTS[entry](model, sparsity, granularity=pk.NM(2, 4)),
        ValueError,
        r"NM\(2, 4\) fixes the sparsity at 0\.5",
    )


def test_nm_with_matching_sparsity_is_fine():
    model = make_mlp()
    pk.prune(model, 0.5, granularity=pk.NM(2, 4))
    assert pk.masked_parameters(model)


def test_nm_layer_sparsity_override_must_be_zero():
    model = make_mlp()
    expect_failure(
        model,
        lambda: pk.prune(model, granularity=pk.NM(2, 4), layer_sparsity={"0": 0.3}),
        ValueError,
        "only be 0.0",
    )


@pytest.mark.parametrize(("make_nm", "exc"), [(lambda: pk.NM(4, 4), ValueError), (lambda: pk.NM(2.0, 4), TypeError)])
def test_bad_nm(make_nm, exc):
    with pytest.raises(exc, match="NM"):
        make_nm()


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("min_kept", "exc"),
    [(-1, ValueError), (1.5, (TypeError, ValueError)), (True, (TypeError, ValueError)), ("1", (TypeError, ValueError))],
)
def test_bad_min_kept(entry, min_kept, exc):
    model = make_net()
    expect_failure(model, lambda: ENTRY_POINTS[entry](model, 0.5, min_kept=min_kept), exc, "min_kept")


@pytest.mark.parametrize("criterion", ["magnitude", "movement"])
def test_optimizer_that_is_not_an_optimizer(criterion):
    model = make_net()
    before, reference = snapshot(model), copy.deepcopy(model)
    with pytest.raises(Exception) as info:  # noqa: B017 - the type is checked below, after the model
        pk.Pruner(model, 0.5, criterion=criterion, optimizer="adam")
    assert_unchanged(model, before, reference)  # no hooks left behind by the half-built pruner
    assert isinstance(info.value, TypeError), repr(info.value)
    assert "optimizer" in str(info.value)


def test_detaching_an_optimizer_that_is_not_attached():
    model = make_net()
    pruner = pk.prune(model, 0.5, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="not attached"):
        pruner.detach_optimizer(torch.optim.Adam(model.parameters()))


@pytest.mark.parametrize("step", [-1, 1.5])
def test_bad_rewind_step(step):
    model = make_net()
    pruner = pk.Pruner(model, 0.5, schedule=pk.OneShot(at=5))
    with pytest.raises(ValueError, match="step"):
        pruner.rewind_to(step)


# ---------------------------------------------------------------------------- pruner state_dict


def saved_state(model):
    pruner = pk.prune(model, 0.5)
    buffer = io.BytesIO()
    torch.save(pruner.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_load_fails(target_model, state, match):
    pruner = pk.Pruner(target_model, 0.5, schedule=pk.OneShot(at=10))
    before, reference = snapshot(target_model), copy.deepcopy(target_model)
    with pytest.raises(ValueError, match=match):
        pruner.load_state_dict(state)
    assert_unchanged(target_model, before, reference, allow_hooks=True)
    assert pruner.step_count == 0


def test_load_state_dict_from_a_model_with_other_layer_names():
    state = saved_state(make_net())
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    assert_load_fails(other, state, r"'conv\.weight'")


def test_load_state_dict_from_a_model_with_other_shapes():
    state = saved_state(make_net(hidden=8))
    assert_load_fails(make_net(hidden=16), state, "fc1")


def test_load_state_dict_from_a_model_whose_shapes_differ_by_less_than_a_byte():
    """3×5 = 15 and 4×4 = 16 weights both pack into 2 bytes; the mask must still be refused."""
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(5, 3))
    state = saved_state(small)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(4, 4))
    assert_load_fails(other, state, "0.weight")


def test_load_state_dict_from_a_model_with_transposed_shapes():
    torch.manual_seed(0)
    state = saved_state(nn.Sequential(nn.Linear(6, 4)))
    torch.manual_seed(0)
    assert_load_fails(nn.Sequential(nn.Linear(4, 6)), state, "0.weight")


def test_load_state_dict_that_is_not_a_pruner_state():
    model = make_net()
    assert_load_fails(model, model.state_dict(), "not a prunekit Pruner state_dict")
    assert_load_fails(model, {"version": 99, "masks": {}}, "version")


def test_load_state_dict_failure_keeps_existing_masks():
    model = make_net()
    pruner = pk.prune(model, 0.5)
    masks = {k: v.clone() for k, v in pk.masked_parameters(model).items()}
    before = snapshot(model)
    torch.manual_seed(1)
    state = saved_state(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)))
    with pytest.raises(ValueError):
        pruner.load_state_dict(state)
    after = pk.masked_parameters(model)
    assert after.keys() == masks.keys() and all(torch.equal(after[k], masks[k]) for k in masks)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("owl", ["owl", "OWL()"])
def test_owl_outside_calibrated_pruning_says_what_it_needs(owl):
    model = nn.Sequential(nn.Linear(8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    value = pk.OWL() if owl == "OWL()" else owl
    with pytest.raises(TypeError, match="calibration activations.*calibration=batches, layer_sparsity='owl'"):
        pk.Pruner(model, 0.5, layer_sparsity=value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
