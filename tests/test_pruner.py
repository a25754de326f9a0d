"""Behaviour of pk.Pruner and pk.prune: scopes, overrides, selection, schedules, optimizers,
lottery tickets, persistence, torch.compile, remove(), gradient criteria and N:M sparsity."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk

# ---------------------------------------------------------------------------- models and helpers


class ConvNet(nn.Module):
    """Two convs and two linears; takes (N, 3, 6, 6). Layers: features.0, features.2, classifier.0, classifier.2."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


CONV_LAYERS = ("features.0", "features.2")
LINEAR_LAYERS = ("classifier.0", "classifier.2")
ALL_LAYERS = CONV_LAYERS + LINEAR_LAYERS


class MLP(nn.Module):
    """Linear(12, 16) → Tanh → Linear(16, 16) → Tanh → Linear(16, 4). Layers: net.0, net.2, net.4.

    Tanh (not ReLU) so that every weight gets a non-zero gradient."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


MLP_LAYERS = ("net.0", "net.2", "net.4")


def make(cls, seed=0):
    torch.manual_seed(seed)
    return cls()


def conv_batches(n, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 6, 6, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def mlp_batches(n, seed=1, batch=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 12, generator=g), torch.randint(0, 4, (batch,), generator=g)) for _ in range(n)]


def train_step(model, optimizer, batch):
    x, y = batch
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()


def weight_of(model, name):
    return model.get_submodule(name).weight


def n_zero(tensor):
    return int((tensor == 0).sum())


def pruned_counts(model, names):
    """{layer: number of pruned weights according to its mask (0 if it has no mask)}."""
    masks = pk.masked_parameters(model)
    counts = {}
    for name in names:
        keep = masks.get(f"{name}.weight")
        counts[name] = 0 if keep is None else int((~keep).sum())
    return counts


def assert_pruned_are_zero(model):
    masks = pk.masked_parameters(model)
    assert masks, "expected masks on the model"
    for full_name, keep in masks.items():
        param = model.get_parameter(full_name)
        assert torch.equal(param.detach()[~keep], torch.zeros(int((~keep).sum()))), full_name


def expected_local_pruned(sparsity, n, min_kept=1):
    return min(round(sparsity * n), n - min(min_kept, n)) if sparsity > 0 else 0


def cubic(step, final, start=0, end=100):
    if step < start:
        return 0.0
    p = min(1.0, (step - start) / (end - start))
    return final * (1.0 - (1.0 - p) ** 3)


# ---------------------------------------------------------------------------- scope and selection


@pytest.mark.parametrize("min_kept", [1, 0])
def test_global_magnitude_exact_sparsity_prunes_globally_smallest(min_kept):
    model = make(ConvNet)
    before = {name: weight_of(model, name).detach().clone() for name in ALL_LAYERS}
    biases = {name: model.get_submodule(name).bias.detach().clone() for name in ALL_LAYERS}
    total = sum(w.numel() for w in before.values())

    pruner = pk.prune(
        model, sparsity=0.9, criterion="magnitude", granularity="weight", scope="global", min_kept=min_kept
    )

    masks = pk.masked_parameters(model)
    assert set(masks) == {f"{name}.weight" for name in ALL_LAYERS}
    n_pruned = sum(int((~keep).sum()) for keep in masks.values())
    assert n_pruned == round(0.9 * total)
    assert pruner.sparsity == round(0.9 * total) / total
    # The weights themselves: pruned ones are exactly zero, kept ones untouched.
    assert sum(n_zero(weight_of(model, name)) for name in ALL_LAYERS) == round(0.9 * total)
    for name in ALL_LAYERS:
        keep = masks[f"{name}.weight"]
        assert torch.equal(weight_of(model, name).detach(), before[name] * keep)
        assert torch.equal(model.get_submodule(name).bias.detach(), biases[name])
    # The pruned weights are the smallest |w| over the whole model, apart from the best min_kept
    # weights of every layer, which are always kept.
    pruned_abs = torch.cat([before[n][~masks[f"{n}.weight"]].abs() for n in ALL_LAYERS])
    kept_abs = []
    for n in ALL_LAYERS:
        values = before[n][masks[f"{n}.weight"]].abs().sort(descending=True).values
        kept_abs.append(values[min_kept:])
    assert pruned_abs.max() <= torch.cat(kept_abs).min()
    # features.2 (fan-in 72) has the smallest weights: at 90% global it would be emptied but for min_kept
    assert int(masks["features.2.weight"].sum()) == (1 if min_kept == 1 else 0)
    # Global scope prunes the layers unevenly (a local prune would give each 90%).
    fractions = {n: float((~masks[f"{n}.weight"]).float().mean()) for n in ALL_LAYERS}
    assert len({round(f, 2) for f in fractions.values()}) > 1


def test_local_scope_prunes_every_layer_to_the_same_sparsity():
    model = make(ConvNet)
    before = {name: weight_of(model, name).detach().clone() for name in ALL_LAYERS}
    pk.prune(model, sparsity=0.7, scope="local")
    masks = pk.masked_parameters(model)
    for name in ALL_LAYERS:
        keep = masks[f"{name}.weight"]
        n = keep.numel()
        assert int((~keep).sum()) == round(0.7 * n)
        assert abs(int((~keep).sum()) / n - 0.7) <= 1 / n
        # within a layer the smallest |w| go
        assert before[name][~keep].abs().max() <= before[name][keep].abs().min()


def test_layer_sparsity_zero_leaves_layer_dense():
    model = make(ConvNet)
    dense_before = weight_of(model, "classifier.2").detach().clone()
    pk.prune(model, sparsity=0.8, layer_sparsity={"classifier.2": 0.0})
    counts = pruned_counts(model, ALL_LAYERS)
    assert counts["classifier.2"] == 0
    assert torch.equal(weight_of(model, "classifier.2").detach(), dense_before)
    for name in ("features.0", "features.2", "classifier.0"):
        assert counts[name] == round(0.8 * weight_of(model, name).numel())


@pytest.mark.parametrize("scope", ["local", "global"])
def test_layer_sparsity_parent_pattern_covers_children(scope):
    model = make(ConvNet)
    pk.prune(model, sparsity=0.8, scope=scope, layer_sparsity={"features": 0.3})
    counts = pruned_counts(model, ALL_LAYERS)
    for name in CONV_LAYERS:
        assert counts[name] == round(0.3 * weight_of(model, name).numel())
    if scope == "local":
        for name in LINEAR_LAYERS:
            assert counts[name] == round(0.8 * weight_of(model, name).numel())
    else:
        pooled = sum(weight_of(model, name).numel() for name in LINEAR_LAYERS)
        assert counts["classifier.0"] + counts["classifier.2"] == round(0.8 * pooled)


def test_layer_sparsity_first_matching_pattern_wins():
    model = make(ConvNet)
    pk.prune(model, sparsity=0.8, layer_sparsity={"features.0": 0.0, "features": 0.5})
    counts = pruned_counts(model, ALL_LAYERS)
    assert counts["features.0"] == 0
    assert counts["features.2"] == round(0.5 * 576)
    assert counts["classifier.0"] == round(0.8 * 512)


@pytest.mark.parametrize(
    ("options", "pruned_layers"),
    [
        ({"include": nn.Conv2d}, CONV_LAYERS),
        ({"include": [nn.Linear]}, LINEAR_LAYERS),
        ({"include": "classifier"}, LINEAR_LAYERS),
        ({"include": [nn.Conv2d, "classifier.2"]}, ("features.0", "features.2", "classifier.2")),
        ({"include": r"features\.\d"}, CONV_LAYERS),
        ({"exclude": nn.Linear}, CONV_LAYERS),
        ({"exclude": "features.0"}, ("features.2", "classifier.0", "classifier.2")),
        ({"exclude": "features"}, LINEAR_LAYERS),
        ({"exclude": [nn.Conv2d, "classifier.0"]}, ("classifier.2",)),
        ({"include": nn.Linear, "exclude": "classifier.0"}, ("classifier.2",)),
    ],
)
def test_include_exclude(options, pruned_layers):
    model = make(ConvNet)
    before = {name: weight_of(model, name).detach().clone() for name in ALL_LAYERS}
    pruner = pk.prune(model, sparsity=0.5, **options)
    assert set(pk.masked_parameters(model)) == {f"{name}.weight" for name in pruned_layers}
    assert [t.name for t in pruner.targets] == list(pruned_layers)
    for name in ALL_LAYERS:
        weight = weight_of(model, name).detach()
        if name in pruned_layers:
            assert n_zero(weight) == round(0.5 * weight.numel())
        else:
            assert torch.equal(weight, before[name])


def tiny_layer_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.mul_(1e-6)
    return model


@pytest.mark.parametrize("min_kept", [1, 3])
def test_min_kept_never_empties_a_layer_in_global_pruning(min_kept):
    model = tiny_layer_model()
    sizes = {name: weight_of(model, name).numel() for name in ("0", "2", "4")}
    total = sum(sizes.values())
    pk.prune(model, sparsity=0.99, scope="global", min_kept=min_kept)
    masks = pk.masked_parameters(model)
    kept = {name: int(masks[f"{name}.weight"].sum()) for name in sizes}
    for name in sizes:
        assert kept[name] >= min_kept, kept
        assert int((weight_of(model, name) != 0).sum()) >= min_kept
    assert total - sum(kept.values()) == min(round(0.99 * total), total - len(sizes) * min_kept)
    # the tiny layer keeps exactly min_kept (its weights are the smallest everywhere)
    assert kept["2"] == min_kept


def test_min_kept_zero_allows_emptying_a_layer():
    model = tiny_layer_model()
    total = sum(weight_of(model, name).numel() for name in ("0", "2", "4"))
    pk.prune(model, sparsity=0.99, scope="global", min_kept=0)
    masks = pk.masked_parameters(model)
    assert not masks["2.weight"].any()
    assert torch.count_nonzero(model[2].weight) == 0
    assert sum(int((~keep).sum()) for keep in masks.values()) == round(0.99 * total)


def _abs_scores(weight, module):
    return weight.abs() * (1.0 + module.weight.shape[0])


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("criterion", ["magnitude", "l2", "random", "custom", "Random(seed=5)"])
def test_exact_count_for_every_criterion(criterion, scope):
    criterion = {"custom": _abs_scores, "Random(seed=5)": pk.Random(seed=5)}.get(criterion, criterion)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 25), nn.ReLU(), nn.Linear(25, 10))
    pk.prune(model, 0.8, criterion=criterion, scope=scope)
    pruned = {k: int((~v).sum()) for k, v in pk.masked_parameters(model).items()}
    if scope == "local":
        assert pruned == {"0.weight": 800, "2.weight": 200}
    else:
        assert sum(pruned.values()) == 1000
    for name, count in pruned.items():
        assert n_zero(model.get_parameter(name)) == count


def test_random_criterion_is_reproducible():
    masks = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 25))
        pk.prune(model, 0.5, criterion="random", seed=7)
        masks.append(pk.masked_parameters(model)["0.weight"])
    assert torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("min_kept", [1, 2])
def test_min_kept_in_local_scope(min_kept):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    pk.prune(model, sparsity=0.95, scope="local", min_kept=min_kept)
    for keep in pk.masked_parameters(model).values():
        assert int(keep.sum()) == min_kept


# ---------------------------------------------------------------------------- property tests

layer_dims = st.lists(st.integers(1, 10), min_size=2, max_size=4)


def linear_stack(dims, seed):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1)])


@settings(max_examples=40, deadline=None)
@given(
    dims=layer_dims, sparsity=st.floats(0.0, 0.99), scope=st.sampled_from(["local", "global"]), seed=st.integers(0, 99)
)
def test_property_achieved_sparsity_matches_request(dims, sparsity, scope, seed):
    model = linear_stack(dims, seed)
    sizes = [layer.weight.numel() for layer in model]
    pk.prune(model, sparsity=sparsity, scope=scope)
    masks = pk.masked_parameters(model)
    pruned = [int((~masks[f"{i}.weight"]).sum()) if f"{i}.weight" in masks else 0 for i in range(len(model))]
    for layer, keep_count in zip(model, pruned):
        assert n_zero(layer.weight) == keep_count
    if scope == "local":
        for n, count in zip(sizes, pruned):
            assert count == expected_local_pruned(sparsity, n)
            if count < n - 1:  # not capped by min_kept: within one unit of the request
                assert abs(count - sparsity * n) <= 0.5
    else:
        total = sum(sizes)
        expected = min(round(sparsity * total), total - len(sizes)) if sparsity > 0 else 0
        assert sum(pruned) == expected
        for n, count in zip(sizes, pruned):
            assert n - count >= 1


@settings(max_examples=25, deadline=None)
@given(
    dims=layer_dims,
    sparsity=st.floats(0.05, 0.95),
    start=st.integers(0, 3),
    span=st.integers(0, 8),
    every=st.integers(1, 4),
    scope=st.sampled_from(["local", "global"]),
    seed=st.integers(0, 99),
)
def test_property_masks_grow_monotonically_and_pruned_stay_zero(dims, sparsity, start, span, every, scope, seed):
    model = linear_stack(dims, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    schedule = pk.Gradual(start=start, end=start + span, every=every)
    pruner = pk.Pruner(model, sparsity, scope=scope, schedule=schedule, optimizer=optimizer)
    g = torch.Generator().manual_seed(seed)
    previous = {}
    previous_sparsity = 0.0
    for _ in range(start + span + 3):
        x = torch.randn(5, dims[0], generator=g)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        masks = pk.masked_parameters(model)
        if masks:
            assert_pruned_are_zero(model)  # right after optimizer.step(): the optimizer is attached
        pruner.step()
        masks = pk.masked_parameters(model)
        for name, keep in masks.items():
            if name in previous:
                assert not (keep & ~previous[name]).any(), "a pruned weight came back"
        assert set(previous) <= set(masks)
        previous = {name: keep.clone() for name, keep in masks.items()}
        if masks:
            assert_pruned_are_zero(model)
        assert pruner.sparsity >= previous_sparsity
        previous_sparsity = pruner.sparsity
    sizes = [layer.weight.numel() for layer in model]
    if scope == "local":
        for i, n in enumerate(sizes):
            keep = previous.get(f"{i}.weight")
            assert (0 if keep is None else int((~keep).sum())) == expected_local_pruned(sparsity, n)
    else:
        total = sum(sizes)
        assert sum(int((~k).sum()) for k in previous.values()) == min(round(sparsity * total), total - len(sizes))


# ---------------------------------------------------------------------------- optimizers

OPTIMIZERS = {
    "sgd_momentum_wd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
}
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


def assert_state_zero_at_pruned(model, optimizer, masks=None):
    checked = 0
    for full_name, keep in (pk.masked_parameters(model) if masks is None else masks).items():
        state = optimizer.state.get(model.get_parameter(full_name), {})
        for key in STATE_KEYS:
            if key in state:
                assert torch.count_nonzero(state[key][~keep]) == 0, (full_name, key)
                checked += 1
    return checked


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_optimizers_pruned_weights_stay_zero_with_pruner_step(opt_name):
    model = make(MLP)
    optimizer = OPTIMIZERS[opt_name](model.parameters())
    batches = mlp_batches(8)
    for batch in batches[:3]:  # build up optimizer state before pruning
        train_step(model, optimizer, batch)
    pruner = pk.prune(model, sparsity=0.75)
    masks = {k: v.clone() for k, v in pk.masked_parameters(model).items()}
    for batch in batches[3:]:
        train_step(model, optimizer, batch)
        pruner.step()
        assert_pruned_are_zero(model)
        for full_name, keep in masks.items():
            assert torch.all(model.get_parameter(full_name).detach()[~keep] == 0.0)
    # pruning happened once; pruner.step() without a schedule event does not change the masks
    assert all(torch.equal(pk.masked_parameters(model)[k], v) for k, v in masks.items())


@pytest.mark.parametrize("mask_gradients", [False, True])
@pytest.mark.parametrize("how", ["attach_optimizer", "constructor"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_attached_optimizer_keeps_pruned_zero_right_after_step(opt_name, how, mask_gradients):
    model = make(MLP)
    optimizer = OPTIMIZERS[opt_name](model.parameters())
    if how == "attach_optimizer":
        pruner = pk.prune(model, sparsity=0.75, mask_gradients=mask_gradients)
        pruner.attach_optimizer(optimizer)
    else:
        pruner = pk.prune(model, sparsity=0.75, optimizer=optimizer, mask_gradients=mask_gradients)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    for batch in mlp_batches(5):
        train_step(model, optimizer, batch)
        assert_pruned_are_zero(model)  # before pruner.step()
        if mask_gradients:  # the state never holds anything at pruned entries
            assert assert_state_zero_at_pruned(model, optimizer) > 0
    pruner.step()
    assert_pruned_are_zero(model)
    # and the kept weights did move
    masks = pk.masked_parameters(model)
    for full_name, keep in masks.items():
        moved = model.get_parameter(full_name).detach() != initial[full_name]
        assert moved[keep].any()
    # on removal the state is cleared at pruned entries, so nothing comes back
    pruner.remove()
    assert assert_state_zero_at_pruned(model, optimizer, masks) > 0


@pytest.mark.parametrize("mask_gradients", [False, True])
@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adam", "lbfgs"])
def test_attached_optimizer_stepping_with_a_closure_keeps_pruned_zero(opt_name, mask_gradients):
    """``optimizer.step(closure)`` computes the gradients inside step(): pruned weights must still stay 0."""
    model = make(MLP)
    if opt_name == "lbfgs":
        optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    else:
        optimizer = OPTIMIZERS[opt_name](model.parameters())
    pruner = pk.prune(model, sparsity=0.75, optimizer=optimizer, mask_gradients=mask_gradients)
    for x, y in mlp_batches(3):

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        assert_pruned_are_zero(model)  # right after optimizer.step(), before pruner.step()
        if mask_gradients:
            assert_state_zero_at_pruned(model, optimizer)
        pruner.step()
        assert_pruned_are_zero(model)


@pytest.mark.parametrize("mask_gradients", [False, True])
@pytest.mark.parametrize("opt_name", ["adam", "adamw", "sgd_momentum_wd"])
def test_pruning_mid_training_clears_attached_optimizer_state(opt_name, mask_gradients):
    model = make(MLP)
    optimizer = OPTIMIZERS[opt_name](model.parameters())
    pruner = pk.Pruner(model, 0.6, schedule=pk.OneShot(at=3), optimizer=optimizer, mask_gradients=mask_gradients)
    batches = mlp_batches(6)
    for batch in batches[:2]:
        train_step(model, optimizer, batch)
        pruner.step()
    assert pk.masked_parameters(model) == {}
    train_step(model, optimizer, batches[2])
    state_before = {
        name: {k: v.clone() for k, v in optimizer.state[p].items() if k in STATE_KEYS}
        for name, p in model.named_parameters()
    }
    for name, state in state_before.items():  # the state is non-zero everywhere before the pruning event
        assert state
        for key, value in state.items():
            assert torch.count_nonzero(value) == value.numel(), (name, key)
    pruner.step()  # the pruning event
    masks = pk.masked_parameters(model)
    assert len(masks) == 3
    assert assert_state_zero_at_pruned(model, optimizer) > 0
    for full_name, keep in masks.items():
        for key, value in optimizer.state[model.get_parameter(full_name)].items():
            if key in STATE_KEYS:
                assert torch.equal(value[keep], state_before[full_name][key][keep])
    for batch in batches[3:]:
        train_step(model, optimizer, batch)
        assert_pruned_are_zero(model)
        if mask_gradients:
            assert_state_zero_at_pruned(model, optimizer)
        pruner.step()


# ---------------------------------------------------------------------------- schedules through the pruner


def single_linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 25))  # 1000 weights


def test_gradual_schedule_follows_cubic_at_every_event():
    model = single_linear()
    total = 1000
    pruner = pk.Pruner(model, 0.8, schedule=pk.Gradual(start=0, end=100, every=10))
    assert pruner.schedule.events() == list(range(0, 101, 10))
    previous = 0
    for call in range(1, 101):
        pruner.step()
        pruned = sum(int((~k).sum()) for k in pk.masked_parameters(model).values())
        assert pruned >= previous
        previous = pruned
        if call >= 10:  # event 0 (reached by the first call) is checked on its own below
            last_event = call - call % 10
            expected = cubic(last_event, 0.8) * total
            assert abs(pruned - expected) <= 1, (call, last_event, pruned, expected)
    assert pruner.step_count == 100
    assert pruned == round(0.8 * total)
    assert pruner.sparsity == 0.8


def test_gradual_first_event_prunes_at_the_cubic_value_of_that_event():
    """Event 0 is reached by the first step() call; its sparsity is s(0) = initial."""
    model = single_linear()
    pruner = pk.Pruner(model, 0.8, schedule=pk.Gradual(start=0, end=100, every=10, initial=0.0))
    pruner.step()
    assert pruner.sparsity == 0.0
    model = single_linear()
    pruner = pk.Pruner(model, 0.8, schedule=pk.Gradual(start=0, end=100, every=10, initial=0.2))
    pruner.step()
    assert pruner.sparsity == 0.2


def test_gradual_events_through_pruner_with_a_later_start():
    model = single_linear()
    pruner = pk.Pruner(model, 0.5, schedule=pk.Gradual(start=20, end=40, every=5))
    for call in range(1, 50):
        pruner.step()
        pruned = sum(int((~k).sum()) for k in pk.masked_parameters(model).values())
        if call < 20:
            assert pruned == 0
        events = [e for e in (20, 25, 30, 35, 40) if e <= call]
        if events:
            expected = cubic(events[-1], 0.5, start=20, end=40) * 1000
            assert abs(pruned - expected) <= 1, (call, pruned, expected)
    assert pruner.sparsity == 0.5


def test_oneshot_prunes_at_the_fifth_step_call():
    model = single_linear()
    pruner = pk.Pruner(model, 0.7, schedule=pk.OneShot(at=5))
    for _ in range(4):
        pruner.step()
        assert pk.masked_parameters(model) == {}
        assert pruner.sparsity == 0.0
    pruner.step()
    assert pruner.sparsity == 0.7
    masks = {k: v.clone() for k, v in pk.masked_parameters(model).items()}
    for _ in range(5):
        pruner.step()
    assert all(torch.equal(pk.masked_parameters(model)[k], v) for k, v in masks.items())


def test_iterative_rounds_are_geometric():
    model = single_linear()
    final = 0.875
    pruner = pk.Pruner(model, final, schedule=pk.Iterative(start=0, end=20, rounds=3))
    assert pruner.schedule.events() == [0, 10, 20]
    for call in range(1, 26):
        pruner.step()
        rounds_done = sum(1 for e in (0, 10, 20) if e <= call)
        expected = 1.0 - (1.0 - final) ** (rounds_done / 3)
        pruned = sum(int((~k).sum()) for k in pk.masked_parameters(model).values())
        assert pruned == round(expected * 1000), (call, pruned)
    # 1 - 0.125^(r/3): 50%, 75%, 87.5%: every round removes half of what was left
    assert pruner.sparsity == 0.875


def test_prune_without_argument_at_step_zero_reaches_final_sparsity():
    model = make(ConvNet)
    pruner = pk.Pruner(model, 0.6, schedule=pk.OneShot(at=0))
    pruner.prune()
    counts = pruned_counts(model, ALL_LAYERS)
    for name in ALL_LAYERS:
        assert counts[name] == round(0.6 * weight_of(model, name).numel())
    masks = {k: v.clone() for k, v in pk.masked_parameters(model).items()}
    for _ in range(3):  # the event is done: later steps do not prune again
        pruner.step()
    assert all(torch.equal(pk.masked_parameters(model)[k], v) for k, v in masks.items())


def test_prune_with_explicit_sparsity():
    model = make(ConvNet)
    pruner = pk.Pruner(model, 0.9, schedule=pk.OneShot(at=50))
    pruner.prune(0.5)
    counts = pruned_counts(model, ALL_LAYERS)
    for name in ALL_LAYERS:
        assert counts[name] == round(0.5 * weight_of(model, name).numel())


# ---------------------------------------------------------------------------- lottery tickets


def expected_local_keep(weight, sparsity):
    flat = weight.abs().reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[: round(sparsity * flat.numel())]] = False
    return keep.reshape(weight.shape)


@pytest.mark.parametrize("rewind_step", [0, 2])
def test_lottery_ticket_rewinds_surviving_weights(rewind_step):
    model = make(MLP)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = pk.Pruner(model, 0.8, schedule=pk.OneShot(at=5))
    pruner.rewind_to(rewind_step)
    rewind_point = {k: v.detach().clone() for k, v in model.state_dict().items()} if rewind_step == 0 else None
    trained = None
    for call, batch in enumerate(mlp_batches(5), start=1):
        train_step(model, optimizer, batch)
        if call == 5:
            trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        pruner.step()
        if call == rewind_step:
            rewind_point = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert trained is not None and rewind_point is not None
    masks = pk.masked_parameters(model)
    assert len(masks) == 3
    for name in MLP_LAYERS:
        keep = masks[f"{name}.weight"]
        # the ticket is chosen on the trained weights ...
        assert torch.equal(keep, expected_local_keep(trained[f"{name}.weight"], 0.8))
        weight = weight_of(model, name).detach()
        # ... and the survivors are reset to the rewind point exactly, the others are zero
        assert torch.equal(weight[keep], rewind_point[f"{name}.weight"][keep])
        assert torch.count_nonzero(weight[~keep]) == 0
        assert torch.equal(model.get_submodule(name).bias.detach(), rewind_point[f"{name}.bias"])
    # the trained weights really differ from the rewind point (so the check above means something)
    assert not torch.equal(trained["net.0.weight"], rewind_point["net.0.weight"])


def test_lottery_ticket_iterative_rewinds_after_every_round_and_clears_optimizer():
    model = make(MLP)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = pk.Pruner(model, 0.75, schedule=pk.Iterative(start=3, end=6, rounds=2), optimizer=optimizer)
    pruner.rewind_to(0)
    for call, batch in enumerate(mlp_batches(6), start=1):
        train_step(model, optimizer, batch)
        pruner.step()
        if call in (3, 6):
            for name in MLP_LAYERS:
                keep = pk.masked_parameters(model)[f"{name}.weight"]
                weight = weight_of(model, name).detach()
                assert torch.equal(weight, initial[f"{name}.weight"] * keep)
            assert len(optimizer.state) == 0  # cleared at the rewind
    assert pruner.sparsity == 0.75


def test_rewind_to_a_past_step_raises():
    model = make(MLP)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = pk.Pruner(model, 0.5, schedule=pk.OneShot(at=10))
    for batch in mlp_batches(3):
        train_step(model, optimizer, batch)
        pruner.step()
    with pytest.raises(ValueError, match="rewind"):
        pruner.rewind_to(0)
    with pytest.raises(ValueError, match="step 2"):
        pruner.rewind_to(2)
    pruner.rewind_to(3)  # the current step is fine


# ---------------------------------------------------------------------------- persistence


def pruned_convnet():
    model = make(ConvNet)
    pruner = pk.prune(model, sparsity=0.7, scope="global")
    return model, pruner


def assert_same_masks(a, b):
    masks_a, masks_b = pk.masked_parameters(a), pk.masked_parameters(b)
    assert masks_a.keys() == masks_b.keys()
    assert masks_a
    for key in masks_a:
        assert torch.equal(masks_a[key], masks_b[key])


def assert_same_params(a, b):
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    assert params_a.keys() == params_b.keys()
    for key in params_a:
        assert torch.equal(params_a[key].detach(), params_b[key].detach()), key


def test_deepcopy_keeps_masks_and_weights():
    model, _ = pruned_convnet()
    clone = copy.deepcopy(model)
    assert_same_masks(model, clone)
    assert_same_params(model, clone)


def test_pickle_roundtrip_keeps_masks():
    model, _ = pruned_convnet()
    clone = pickle.loads(pickle.dumps(model))
    assert_same_masks(model, clone)
    assert_same_params(model, clone)
    x = conv_batches(1)[0][0]
    assert torch.equal(model(x), clone(x))


def test_torch_save_whole_model_keeps_masks():
    model, _ = pruned_convnet()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    clone = torch.load(buffer, weights_only=False)
    assert_same_masks(model, clone)
    assert_same_params(model, clone)


def test_state_dict_has_no_mask_keys_and_loads_strictly_into_fresh_model():
    model, _ = pruned_convnet()
    state = model.state_dict()
    assert not any("_pk_mask" in key for key in state)
    assert set(state) == set(make(ConvNet).state_dict())
    fresh = make(ConvNet, seed=123)
    fresh.load_state_dict(state, strict=True)
    assert_same_params(model, fresh)
    assert pk.masked_parameters(fresh) == {}


def mlp_run_setup(model, criterion="magnitude", attach=True):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    schedule = pk.Gradual(start=2, end=16, every=4)  # events 2, 6, 10, 14, 16
    pruner = pk.Pruner(model, 0.8, criterion=criterion, schedule=schedule, optimizer=optimizer if attach else None)
    return optimizer, pruner


@pytest.mark.parametrize(
    ("criterion", "attach"),
    [("magnitude", True), ("magnitude", False), ("movement", True), ("gradient", True), ("random", False)],
)
def test_pruner_checkpoint_resume_gives_identical_training(criterion, attach):
    def mlp_run_setup_(model):
        return mlp_run_setup(model, criterion, attach)

    batches = mlp_batches(20, seed=7)
    checkpoint_at = 8

    # uninterrupted run
    model_a = make(MLP)
    opt_a, pruner_a = mlp_run_setup_(model_a)
    for batch in batches:
        train_step(model_a, opt_a, batch)
        pruner_a.step()

    # interrupted run: train to the checkpoint, save everything ...
    model_b = make(MLP)
    opt_b, pruner_b = mlp_run_setup_(model_b)
    for batch in batches[:checkpoint_at]:
        train_step(model_b, opt_b, batch)
        pruner_b.step()
    assert 0 < pruner_b.sparsity < 0.8  # events before the checkpoint happened, others are still to come
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "pruner": pruner_b.state_dict()}, buffer)
    saved_masks = {k: v.clone() for k, v in pk.masked_parameters(model_b).items()}
    del model_b, opt_b, pruner_b

    # ... and resume into fresh objects
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model_c = make(MLP, seed=99)
    model_c.load_state_dict(checkpoint["model"], strict=True)
    opt_c, pruner_c = mlp_run_setup_(model_c)
    opt_c.load_state_dict(checkpoint["opt"])
    pruner_c.load_state_dict(checkpoint["pruner"])
    assert pruner_c.step_count == checkpoint_at
    assert pruner_c.state_dict()["last_event"] == 6
    restored = pk.masked_parameters(model_c)
    assert restored.keys() == saved_masks.keys()
    assert all(torch.equal(restored[k], saved_masks[k]) for k in saved_masks)
    for batch in batches[checkpoint_at:]:
        train_step(model_c, opt_c, batch)
        pruner_c.step()

    assert pruner_c.step_count == pruner_a.step_count == 20
    assert_same_masks(model_a, model_c)
    assert_same_params(model_a, model_c)
    assert pruner_c.sparsity == pruner_a.sparsity


def test_pruner_state_dict_roundtrip_with_random_criterion_continues_identically():
    def setup(model):
        return pk.Pruner(model, 0.75, criterion="random", seed=3, schedule=pk.Iterative(start=1, end=5, rounds=3))

    model_a = make(MLP)
    pruner_a = setup(model_a)
    for _ in range(6):
        pruner_a.step()
    model_b = make(MLP)
    pruner_b = setup(model_b)
    for _ in range(2):
        pruner_b.step()
    buffer = io.BytesIO()
    torch.save(pruner_b.state_dict(), buffer)
    buffer.seek(0)
    model_c = make(MLP)
    model_c.load_state_dict(model_b.state_dict())
    pruner_c = setup(model_c)
    pruner_c.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(4):
        pruner_c.step()
    assert_same_masks(model_a, model_c)


# ---------------------------------------------------------------------------- torch.compile


def _compile_check(backend):
    model = make(ConvNet)
    pruner = pk.prune(model, sparsity=0.8, scope="global")
    masks = pk.masked_parameters(model)
    batches = conv_batches(4)
    x, y = batches[0]
    eager = model(x)
    compiled = torch.compile(model, backend=backend)
    out = compiled(x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=0)
    # Training through the compiled model: first without an attached optimizer (pruner.step()
    # re-applies the masks), then with one (pruned weights are zero right after optimizer.step()).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i, (x, y) in enumerate(batches):
        if i == 2:
            pruner.attach_optimizer(optimizer)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        optimizer.step()
        if i >= 2:
            assert_pruned_are_zero(model)
        pruner.step()
        assert_pruned_are_zero(model)
        for full_name, keep in masks.items():  # the kept weights do train
            assert not torch.equal(model.get_parameter(full_name).detach()[keep], before[full_name][keep])
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=0)


def test_torch_compile_aot_eager_on_pruned_model():
    torch._dynamo.reset()
    _compile_check("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_on_pruned_model():
    torch._dynamo.reset()
    _compile_check("inductor")


# ---------------------------------------------------------------------------- remove


def test_remove_drops_masks_and_hooks_and_keeps_zeros():
    model = make(MLP)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = pk.prune(model, sparsity=0.6, optimizer=optimizer)
    masks = {k: v.clone() for k, v in pk.masked_parameters(model).items()}
    returned = pruner.remove()
    assert returned is model
    assert pk.masked_parameters(model) == {}
    assert not any(name.startswith("_pk_mask_") for module in model.modules() for name in module._buffers)
    for full_name, keep in masks.items():
        assert torch.count_nonzero(model.get_parameter(full_name).detach()[~keep]) == 0
    for param in model.parameters():
        assert not param._post_accumulate_grad_hooks
        assert not param._backward_hooks
    assert not optimizer._optimizer_step_post_hooks
    assert not optimizer._optimizer_step_pre_hooks
    # a training step now moves the formerly pruned weights: nothing enforces the masks any more.
    # It trains exactly like a hook-free copy (deepcopy does not copy tensor hooks) ...
    reference = copy.deepcopy(model)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    batch = mlp_batches(1)[0]
    train_step(model, optimizer, batch)
    train_step(reference, ref_optimizer, batch)
    assert_same_params(model, reference)
    # ... and every formerly pruned weight with a non-zero gradient has moved away from zero.
    moved = 0
    for full_name, keep in masks.items():
        param = model.get_parameter(full_name)
        has_grad = param.grad[~keep] != 0
        assert torch.equal(param.detach()[~keep] != 0, has_grad)
        moved += int(has_grad.sum())
    assert moved > 0
    with pytest.raises(RuntimeError, match="removed"):
        pruner.step()
    with pytest.raises(RuntimeError, match="removed"):
        pruner.prune()


def test_remove_with_movement_criterion_removes_its_hooks():
    model = make(MLP)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = pk.Pruner(model, 0.5, criterion="movement", schedule=pk.OneShot(at=2))
    for batch in mlp_batches(2):
        train_step(model, optimizer, batch)
        pruner.step()
    pruner.remove()
    for param in model.parameters():
        assert not param._backward_hooks
        assert not param._post_accumulate_grad_hooks


# ---------------------------------------------------------------------------- gradient criteria in a pruner


def test_movement_criterion_observes_training_backward_passes():
    model = make(MLP)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = pk.Pruner(model, 0.5, criterion="movement", schedule=pk.OneShot(at=3))
    sums = {name: torch.zeros_like(weight_of(model, name)) for name in MLP_LAYERS}
    magnitude_at_event = None
    for call, (x, y) in enumerate(mlp_batches(3), start=1):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name in MLP_LAYERS:
            weight = weight_of(model, name)
            sums[name].addcmul_(weight.detach(), weight.grad)
        optimizer.step()
        if call == 3:
            magnitude_at_event = {name: weight_of(model, name).detach().clone() for name in MLP_LAYERS}
        pruner.step()
    assert pruner.criterion.batches_seen > 0
    masks = pk.masked_parameters(model)
    differs_from_magnitude = False
    for name in MLP_LAYERS:
        scores = -sums[name]
        flat = scores.reshape(-1)
        expected = torch.ones(flat.numel(), dtype=torch.bool)
        expected[torch.argsort(flat, stable=True)[: round(0.5 * flat.numel())]] = False
        expected = expected.reshape(scores.shape)
        assert torch.equal(masks[f"{name}.weight"], expected), name
        differs_from_magnitude |= not torch.equal(expected, expected_local_keep(magnitude_at_event[name], 0.5))
    assert differs_from_magnitude


def test_gradient_criterion_without_data_in_pruner_uses_training_backward_passes():
    model = make(MLP)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = pk.Gradual(start=2, end=6, every=2, initial=0.3)  # events 2, 4, 6
    pruner = pk.Pruner(model, 0.6, criterion="gradient", schedule=schedule)
    sums = {name: torch.zeros_like(weight_of(model, name)) for name in MLP_LAYERS}
    for call, (x, y) in enumerate(mlp_batches(8), start=1):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if call <= 2:
            for name in MLP_LAYERS:
                weight = weight_of(model, name)
                sums[name].addcmul_(weight.detach(), weight.grad)
        optimizer.step()
        pruner.step()
        if call == 2:  # first event, at sparsity 0.3: scores are |Σ w·g| over the two backward passes
            masks = pk.masked_parameters(model)
            for name in MLP_LAYERS:
                scores = sums[name].abs().reshape(-1)
                expected = torch.ones(scores.numel(), dtype=torch.bool)
                expected[torch.argsort(scores, stable=True)[: round(0.3 * scores.numel())]] = False
                assert torch.equal(masks[f"{name}.weight"].reshape(-1), expected), name
        if call >= 2:
            assert_pruned_are_zero(model)
    counts = pruned_counts(model, MLP_LAYERS)
    for name in MLP_LAYERS:
        assert counts[name] == round(0.6 * weight_of(model, name).numel())


def test_gradient_criterion_event_before_any_backward_raises():
    model = make(MLP)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = pk.Pruner(model, 0.5, criterion="gradient", schedule=pk.Gradual(start=1, end=5, every=1))
    with pytest.raises(ValueError, match="data="):
        pruner.step()
    assert pk.masked_parameters(model) == {}
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


# ---------------------------------------------------------------------------- N:M


def group_counts(weight, m=4):
    """Non-zeros of every group of m consecutive weights along the input dimension (dim 1)."""
    out_dim, in_dim = weight.shape[:2]
    kernel = math.prod(weight.shape[2:])
    groups = weight.detach().reshape(out_dim, in_dim, kernel).reshape(out_dim, in_dim // m, m, kernel)
    return (groups != 0).sum(dim=2)


def nm_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 12), nn.Linear(12, 4)
    )


def test_nm_2_4_keeps_two_in_every_group_of_four():
    model = nm_model()
    before = {i: model[i].weight.detach().clone() for i in (0, 4, 5)}
    pruner = pk.prune(model, granularity=pk.NM(2, 4))
    for i in (0, 4, 5):
        counts = group_counts(model[i].weight)
        assert torch.all(counts == 2), i
        # the two largest |w| of every group survive
        weight = before[i]
        out_dim, in_dim = weight.shape[:2]
        groups = weight.reshape(out_dim, in_dim, -1).reshape(out_dim, in_dim // 4, 4, -1).abs()
        kept = model[i].weight.detach().reshape(out_dim, in_dim, -1).reshape(out_dim, in_dim // 4, 4, -1) != 0
        assert torch.all(
            groups.masked_fill(kept, -math.inf).amax(dim=2) <= groups.masked_fill(~kept, math.inf).amin(dim=2)
        )
    assert pruner.sparsity == 0.5


def test_nm_under_gradual_schedule_goes_4_3_2():
    model = nm_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = pk.Pruner(model, granularity=pk.NM(2, 4), schedule=pk.Gradual(start=0, end=10, every=1))
    seen = []
    previous = None
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        optimizer.zero_grad()
        model(torch.randn(2, 4, 5, 5, generator=g)).square().mean().backward()
        optimizer.step()
        pruner.step()
        per_layer = [group_counts(model[i].weight) for i in (0, 4, 5)]
        values = torch.unique(torch.cat([c.reshape(-1) for c in per_layer])).tolist()
        assert len(values) == 1, values  # every group of every layer keeps the same number
        if not seen or seen[-1] != values[0]:
            seen.append(values[0])
        masks = pk.masked_parameters(model)
        if previous is not None:
            for key, keep in masks.items():
                assert not (keep & ~previous[key]).any()
        previous = {k: v.clone() for k, v in masks.items()}
    assert seen == [4, 3, 2]


def test_tied_weights_are_pruned_once():
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight  # tied, as in a language model's embedding and output layer
    model = nn.Sequential(first, nn.ReLU(), second)
    pruner = pk.prune(model, 0.5, scope="global")
    assert [t.name for t in pruner.targets] == ["0"]
    assert n_zero(first.weight) == 32 and second.weight is first.weight
