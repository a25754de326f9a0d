"""Criteria: magnitude, l2, random, custom callables, gradient and movement."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.core.targets import find_targets
from prunekit.methods.criteria import get_criterion

T, F = True, False


def linear(weight: list[list[float]], bias: bool = False) -> nn.Linear:
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def expected_lowest_pruned(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning the k lowest scores (no ties in the tests that use it)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores.reshape(-1), stable=True)[:k]] = False
    return keep.reshape(scores.shape)


# ---------------------------------------------------------------------------- magnitude / l2


def test_magnitude_scores_are_absolute_values():
    layer = linear([[1.0, -3.0], [-0.5, 2.0]])
    target = find_targets(layer)[0]
    crit = pk.Magnitude()
    assert crit.reduce == "sum"
    assert torch.equal(crit.score(target), torch.tensor([[1.0, 3.0], [0.5, 2.0]]))
    mask = pk.prune(layer, sparsity=0.5, criterion="magnitude").masks["weight"]
    assert torch.equal(mask, torch.tensor([[F, T], [F, T]]))


def test_l1_is_an_alias_of_magnitude():
    assert isinstance(get_criterion("l1"), pk.Magnitude)
    assert get_criterion("magnitude").name == "magnitude"


def test_l2_scores_and_reduce():
    layer = linear([[1.0, -3.0], [-0.5, 2.0]])
    crit = get_criterion("l2")
    assert isinstance(crit, pk.L2Magnitude)
    assert crit.reduce == "l2"
    assert torch.equal(crit.score(find_targets(layer)[0]), torch.tensor([[1.0, 3.0], [0.5, 2.0]]))
    # Per weight, l2 and magnitude agree.
    mask = pk.prune(layer, sparsity=0.5, criterion="l2").masks["weight"]
    assert torch.equal(mask, torch.tensor([[F, T], [F, T]]))


def test_l2_and_magnitude_pick_different_in_channels():
    # Columns: [3, 3] (L1 6, L2 4.24) and [5, 0.5] (L1 5.5, L2 5.02).
    weight = [[3.0, 5.0], [3.0, -0.5]]
    mag = pk.prune(linear(weight), sparsity=0.5, granularity="in_channel").masks["weight"]
    l2 = pk.prune(linear(weight), sparsity=0.5, granularity="in_channel", criterion="l2").masks["weight"]
    assert torch.equal(mag, torch.tensor([[T, F], [T, F]]))
    assert torch.equal(l2, torch.tensor([[F, T], [F, T]]))


# ---------------------------------------------------------------------------- random


def test_random_is_reproducible_with_the_same_seed(tiny_model_factory):
    a = pk.prune(tiny_model_factory(), sparsity=0.5, criterion="random", seed=7).masks
    b = pk.prune(tiny_model_factory(), sparsity=0.5, criterion="random", seed=7).masks
    c = pk.prune(tiny_model_factory(), sparsity=0.5, criterion="random", seed=8).masks
    assert set(a) == set(b) == set(c) == {"0.weight", "3.weight"}
    for name in a:
        assert torch.equal(a[name], b[name])
    assert any(not torch.equal(a[name], c[name]) for name in a)


def test_random_ignores_weight_values():
    # Random scores depend on the seed only, not on the weights.
    small = linear([[0.001] * 8] * 8)
    large = linear([[float(i * 8 + j) for j in range(8)] for i in range(8)])
    a = pk.prune(small, sparsity=0.5, criterion="random", seed=3).masks["weight"]
    b = pk.prune(large, sparsity=0.5, criterion="random", seed=3).masks["weight"]
    assert torch.equal(a, b)


def test_random_scores_are_seeded_stable_within_an_event_and_new_each_event():
    layer = nn.Linear(5, 3)
    target = find_targets(layer)[0]
    first, same_seed, other_seed = pk.Random(seed=11), get_criterion("random", seed=11), pk.Random(seed=12)
    for crit in (first, same_seed, other_seed):
        crit.prepare(layer, [target])
    scores = first.score(target)
    assert scores.shape == (3, 5) and bool((scores >= 0).all()) and bool((scores < 1).all())
    assert torch.equal(first.score(target), scores)  # asked twice in one event: the same scores
    assert torch.equal(same_seed.score(target), scores)
    assert not torch.equal(other_seed.score(target), scores)
    first.prepare(layer, [target])
    assert not torch.equal(first.score(target), scores)  # a new event draws new scores


def test_random_state_dict_round_trip():
    layer = nn.Linear(4, 4)
    target = find_targets(layer)[0]
    crit = pk.Random(seed=1)
    crit.prepare(layer, [target])
    state = crit.state_dict()
    crit.prepare(layer, [target])
    expected = crit.score(target)
    other = pk.Random(seed=99)
    other.load_state_dict(state)
    other.prepare(layer, [target])
    assert torch.equal(other.score(target), expected)


# ---------------------------------------------------------------------------- custom


def test_custom_one_argument_function():
    layer = linear([[1.0, -3.0], [-0.5, 2.0]])
    seen = []

    def inverse_magnitude(w):
        seen.append(w.shape)
        return -w.abs()

    mask = pk.prune(layer, sparsity=0.5, criterion=inverse_magnitude).masks["weight"]
    assert torch.equal(mask, torch.tensor([[T, F], [T, F]]))  # the largest two go
    assert seen and all(shape == (2, 2) for shape in seen)  # it may be called more than once


def test_custom_function_with_module_argument():
    model = nn.Sequential(linear([[1.0, 2.0], [3.0, 4.0]]), nn.ReLU(), linear([[4.0, 3.0], [2.0, 1.0]]))
    seen = []

    def by_layer(weight, module):
        seen.append(module)
        # Score by position, reversed for the second layer: the layer decides the order.
        order = torch.arange(weight.numel(), dtype=torch.float32).reshape(weight.shape)
        return order if module is model[0] else -order

    pruner = pk.prune(model, sparsity=0.5, criterion=by_layer)
    # Called with each layer's own module (possibly more than once per layer).
    assert seen[0] is model[0] and {id(m) for m in seen} == {id(model[0]), id(model[2])}
    assert torch.equal(pruner.masks["0.weight"], torch.tensor([[F, F], [T, T]]))
    assert torch.equal(pruner.masks["2.weight"], torch.tensor([[T, T], [F, F]]))


def test_custom_one_argument_with_default_second_argument():
    layer = linear([[1.0, -3.0], [-0.5, 2.0]])

    def scaled(w, scale=2.0):
        assert scale == 2.0  # called with the weight only
        return w.abs() * scale

    mask = pk.prune(layer, sparsity=0.5, criterion=scaled).masks["weight"]
    assert torch.equal(mask, torch.tensor([[F, T], [F, T]]))


def test_custom_builtin_one_argument_callable():
    # torch.abs has no Python signature; as a one-argument scorer it must act like "magnitude".
    layer = linear([[1.0, -3.0], [-0.5, 2.0]])
    mask = pk.prune(layer, sparsity=0.5, criterion=torch.abs).masks["weight"]
    assert torch.equal(mask, torch.tensor([[F, T], [F, T]]))


def test_custom_wrong_shape_raises_and_leaves_model():
    layer = linear([[1.0, -3.0], [-0.5, 2.0]])
    with pytest.raises(ValueError, match="shape"):
        pk.prune(layer, sparsity=0.5, criterion=lambda w: w.abs().sum(dim=0))
    assert torch.equal(layer.weight.detach(), torch.tensor([[1.0, -3.0], [-0.5, 2.0]]))
    assert pk.masked_parameters(layer) == {}


def test_custom_returning_non_tensor_raises_type_error():
    with pytest.raises(TypeError, match="tensor"):
        pk.prune(linear([[1.0, 2.0]]), sparsity=0.5, criterion=lambda w: w.abs().tolist())


def test_custom_class_and_reduce():
    crit = pk.Custom(lambda w: w.abs(), reduce="l2")
    assert crit.reduce == "l2"
    with pytest.raises(ValueError, match="reduce"):
        pk.Custom(lambda w: w.abs(), reduce="max")


# ---------------------------------------------------------------------------- gradient / movement


def _tiny_regression():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(3)]
    return model, batches


def _manual_weight_grad_products(model: nn.Module, batches, loss_fn) -> torch.Tensor:
    """Σ_b w ⊙ ∂L_b/∂w for model.weight, by plain autograd on a copy."""
    clone = copy.deepcopy(model)
    total = torch.zeros_like(clone.weight)
    for x, y in batches:
        clone.zero_grad()
        loss_fn(clone(x), y).backward()
        total += clone.weight.detach() * clone.weight.grad
    return total


def test_gradient_scores_match_manual_autograd():
    model, batches = _tiny_regression()
    loss_fn = nn.functional.mse_loss
    expected = _manual_weight_grad_products(model, batches, loss_fn).abs()
    crit = get_criterion("gradient", data=batches, loss_fn=loss_fn)
    assert isinstance(crit, pk.Gradient)
    targets = find_targets(model)
    crit.prepare(model, targets)
    torch.testing.assert_close(crit.score(targets[0]), expected)
    assert crit.batches_seen == 3


def test_gradient_prune_keeps_highest_taylor_scores():
    model, batches = _tiny_regression()
    loss_fn = nn.functional.mse_loss
    before = model.weight.detach().clone()
    scores = _manual_weight_grad_products(model, batches, loss_fn).abs()
    pruner = pk.prune(model, sparsity=0.5, criterion="gradient", data=batches, loss_fn=loss_fn)
    expected = expected_lowest_pruned(scores, 3)
    assert torch.equal(pruner.masks["weight"], expected)
    assert torch.equal(model.weight.detach(), before * expected)
    # Running the data does not leave gradients behind.
    assert model.weight.grad is None


def test_taylor_is_an_alias_of_gradient():
    assert isinstance(get_criterion("taylor", data=[], loss_fn=lambda o, t: o.sum()), pk.Gradient)


def test_movement_scores_are_minus_sum_of_w_times_grad():
    model, batches = _tiny_regression()
    loss_fn = nn.functional.mse_loss
    expected = -_manual_weight_grad_products(model, batches, loss_fn)
    crit = get_criterion("movement", data=batches, loss_fn=loss_fn)
    assert isinstance(crit, pk.Movement)
    targets = find_targets(model)
    crit.prepare(model, targets)
    torch.testing.assert_close(crit.score(targets[0]), expected)


def test_movement_prune_keeps_highest_movement_scores():
    model, batches = _tiny_regression()
    loss_fn = nn.functional.mse_loss
    scores = -_manual_weight_grad_products(model, batches, loss_fn)
    pruner = pk.prune(model, sparsity=0.5, criterion="movement", data=batches, loss_fn=loss_fn)
    assert torch.equal(pruner.masks["weight"], expected_lowest_pruned(scores, 3))


def test_gradient_without_data_raises_and_mentions_data():
    model, _ = _tiny_regression()
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match="data="):
        pk.prune(model, sparsity=0.5, criterion="gradient")
    assert torch.equal(model.weight.detach(), before)
    assert pk.masked_parameters(model) == {}


def test_movement_without_data_raises_and_mentions_data():
    model, _ = _tiny_regression()
    with pytest.raises(ValueError, match="data="):
        pk.prune(model, sparsity=0.5, criterion="movement")


def test_data_without_loss_fn_raises():
    model, batches = _tiny_regression()
    with pytest.raises(ValueError, match="loss_fn"):
        pk.prune(model, sparsity=0.5, criterion="gradient", data=batches)


def test_data_with_a_non_gradient_criterion_raises():
    model, batches = _tiny_regression()
    with pytest.raises(ValueError, match="data="):
        pk.prune(model, sparsity=0.5, criterion="magnitude", data=batches, loss_fn=nn.functional.mse_loss)


def test_magnitude_prunes_frozen_weights():
    # Magnitude needs no gradients: a frozen layer (requires_grad=False) is pruned like any other.
    layer = linear([[1.0, -3.0], [-0.5, 2.0]])
    layer.requires_grad_(False)
    mask = pk.prune(layer, sparsity=0.5).masks["weight"]
    assert torch.equal(mask, torch.tensor([[F, T], [F, T]]))


def test_gradient_with_frozen_weights_raises():
    model, batches = _tiny_regression()
    model.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        pk.prune(model, sparsity=0.5, criterion="gradient", data=batches, loss_fn=nn.functional.mse_loss)


def test_gradient_data_sums_each_batch_once():
    # The training hooks a pruner registers must not add the data= batches a second time.
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    batches = [(torch.randn(8, 4), torch.randn(8, 3)) for _ in range(2)]
    expected = torch.zeros_like(model.weight)
    for x, y in batches:
        (grad,) = torch.autograd.grad(nn.functional.mse_loss(model(x), y), [model.weight])
        expected += model.weight.detach() * grad
    pruner = pk.Pruner(model, 0.5, criterion="gradient", data=batches, loss_fn=nn.functional.mse_loss)
    pruner.criterion.prepare(model, pruner.targets)
    assert pruner.criterion.batches_seen == 2
    assert torch.allclose(pruner.criterion.sums["weight"], expected, atol=1e-6)


def test_gradient_data_pass_leaves_batchnorm_stats_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    with torch.no_grad():  # give the running statistics non-default values first
        for _ in range(3):
            model(torch.randn(16, 4) * 3 + 1)
    buffers_before = {name: b.clone() for name, b in model.named_buffers()}
    assert int(buffers_before["1.num_batches_tracked"]) == 3
    batches = [(torch.randn(8, 4) * 5 - 2, torch.randn(8, 2)) for _ in range(4)]
    pk.prune(model, sparsity=0.5, criterion="gradient", data=batches, loss_fn=nn.functional.mse_loss)
    buffers_after = {name: b for name, b in model.named_buffers() if not name.rsplit(".", 1)[-1].startswith("_pk_")}
    assert set(buffers_after) == set(buffers_before)
    for name, before in buffers_before.items():
        assert torch.equal(buffers_after[name], before), name
    assert model.training


def test_gradient_accepts_dict_batches():
    class KeywordModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, y=None):
            return self.fc(x)

    torch.manual_seed(1)
    model = KeywordModel()
    batches = [{"x": torch.randn(4, 3), "y": torch.randn(4, 2)} for _ in range(2)]

    def loss_fn(out, batch):
        return nn.functional.mse_loss(out, batch["y"])

    expected = torch.zeros(2, 3)
    for batch in batches:
        model.zero_grad()
        loss_fn(model(**batch), batch).backward()
        expected += model.fc.weight.detach() * model.fc.weight.grad
    model.zero_grad()
    crit = get_criterion("gradient", data=batches, loss_fn=loss_fn)
    targets = find_targets(model)
    crit.prepare(model, targets)
    torch.testing.assert_close(crit.score(targets[0]), expected.abs())


# ---------------------------------------------------------------------------- lookup errors


def test_unknown_criterion_name_raises():
    with pytest.raises(ValueError, match="unknown criterion"):
        get_criterion("magnitud")


def test_non_callable_criterion_raises():
    with pytest.raises(TypeError):
        get_criterion(42)


def test_criterion_instance_is_used_as_is():
    crit = pk.Magnitude()
    assert get_criterion(crit) is crit
