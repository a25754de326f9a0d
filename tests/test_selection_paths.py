"""The pruner gives identical masks whether selection concatenates scores or works in passes."""

import copy

import pytest
import torch
from torch import nn

import prunekit as pk
import prunekit.engines.selection as selection


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 40), nn.Linear(40, 10))
    with torch.no_grad():
        model[4].weight.mul_(1e-3)  # a layer global pruning would empty without min_kept
        model[3].weight[:5].fill_(0.01)  # ties
    return model


def _masks_both_ways(monkeypatch, run):
    on_one_path = run(_model(0))
    passes = []
    real_pass = selection._bracket_pass
    monkeypatch.setattr(selection, "_bracket_pass", lambda *a: passes.append(1) or real_pass(*a))
    with selection.tuned(sort_limit=0, sample_size=64):
        in_passes = run(_model(0))
    assert passes, "the pass-based path was not taken"
    return on_one_path, in_passes


@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("min_kept", [0, 1, 3])
@pytest.mark.parametrize("sparsity", [0.3, 0.9, 0.99])
def test_one_shot_masks_match(monkeypatch, scope, min_kept, sparsity):
    def run(model):
        pk.prune(model, sparsity, scope=scope, min_kept=min_kept)
        return pk.masked_parameters(model), copy.deepcopy(model.state_dict())

    (masks_a, weights_a), (masks_b, weights_b) = _masks_both_ways(monkeypatch, run)
    assert masks_a.keys() == masks_b.keys()
    for name in masks_a:
        assert torch.equal(masks_a[name], masks_b[name]), name
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


@pytest.mark.parametrize("criterion", ["magnitude", "random", "l2"])
def test_gradual_masks_match(monkeypatch, criterion):
    def run(model):
        pruner = pk.Pruner(model, 0.95, criterion=criterion, scope="global", schedule=pk.Gradual(0, 6, 2))
        history = []
        for _ in range(6):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.001)  # weights move between events, like training
            pruner.step()
            history.append({k: v.clone() for k, v in pruner.masks.items()})
        return history

    history_a, history_b = _masks_both_ways(monkeypatch, run)
    for masks_a, masks_b in zip(history_a, history_b):
        for name in masks_a:
            assert torch.equal(masks_a[name], masks_b[name]), name


@pytest.mark.parametrize("sort_limit", [None, 0])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.93])
def test_global_magnitude_prunes_the_lowest_ties_to_the_earlier(sort_limit, sparsity):
    # Many exact ties (weights on a coarse grid, zeros included): the k lowest |w| go, and among
    # equal |w| the earlier (layer, position) goes first, on both paths, with the weights zeroed
    # in place and the others untouched.
    with selection.tuned() if sort_limit is None else selection.tuned(sort_limit=sort_limit):
        _check_global_magnitude_ties(sparsity)


def _check_global_magnitude_ties(sparsity):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(40, 64), nn.Linear(64, 30), nn.Linear(30, 8))
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(torch.randint(-6, 7, layer.weight.shape) / 8.0)
    before = [layer.weight.detach().clone() for layer in model]
    pk.prune(model, sparsity, scope="global", min_kept=0)
    flat = [(float(w.abs()), li, pi) for li, weight in enumerate(before) for pi, w in enumerate(weight.reshape(-1))]
    k = round(sparsity * len(flat))
    pruned = {(li, pi) for _, li, pi in sorted(flat)[:k]}
    for li, layer in enumerate(model):
        expected = torch.tensor([(li, pi) not in pruned for pi in range(before[li].numel())])
        expected = expected.reshape(before[li].shape)
        assert torch.equal(pk.masked_parameters(model)[f"{li}.weight"], expected), li
        assert torch.equal(layer.weight.detach(), torch.where(expected, before[li], torch.zeros(()))), li


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_check.py's machine)")
@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("min_kept", [0, 3])
@pytest.mark.parametrize("sort_on_device", [True, False])
def test_masks_on_a_gpu_equal_those_on_the_cpu(scope, min_kept, sort_on_device):
    """Ranked on the GPU in one sort, or by the counting passes: the same masks as on the CPU."""
    cpu = _model(0)
    pk.prune(cpu, 0.9, scope=scope, min_kept=min_kept)
    tuning = {} if sort_on_device else {"device_sort_limit": 0, "sort_limit": 0, "sample_size": 64}
    gpu = _model(0).cuda()
    with selection.tuned(**tuning):
        pk.prune(gpu, 0.9, scope=scope, min_kept=min_kept)
    expected, found = pk.masked_parameters(cpu), pk.masked_parameters(gpu)
    assert expected.keys() == found.keys()
    for name in expected:
        assert torch.equal(expected[name], found[name].cpu()), name
