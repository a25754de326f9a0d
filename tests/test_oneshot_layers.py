"""Wanda, SparseGPT and OWL on single layers: hand-computed masks, a reference SparseGPT, N:M patterns."""

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prunekit as pk
from prunekit.core.targets import Target
from prunekit.oneshot import (
    Wanda,
    keep_n_of_m,
    keep_per_row,
    outlier_ratio,
    owl_sparsities,
    sparsegpt_prune,
    wanda_keep,
)


def test_wanda_mask_by_hand():
    # |W| = [[1, 2, 3, 4], [4, 3, 2, 1]], ‖X_j‖ = [4, 1, 1, 0.5] → scores [[4, 2, 3, 2], [16, 3, 2, 0.5]]
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
    sq_norms = torch.tensor([16.0, 1.0, 1.0, 0.25])
    keep = wanda_keep(weight, sq_norms, 0.5)
    # row 0 ties 2 = 2 at columns 1 and 3: the earlier column goes first
    assert keep.tolist() == [[True, False, True, False], [True, True, False, False]]
    # magnitude alone would keep columns 2 and 3 of row 0
    assert wanda_keep(weight, torch.ones(4), 0.5)[0].tolist() == [False, False, True, True]


def test_wanda_criterion_scores_from_stats_in_weight_layout():
    linear = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [-1.0, 0.5, 2.0]]))
    target = Target("fc", linear)
    criterion = Wanda({"fc.weight": torch.tensor([4.0, 9.0, 0.0])})
    expected = torch.tensor([[2.0, 6.0, 0.0], [2.0, 1.5, 0.0]])
    assert torch.equal(criterion.score(target), expected)
    assert isinstance(criterion, pk.Criterion) and criterion.name == "wanda"
    shared = Wanda()  # statistics handed over the way a shared calibration pass does it
    shared.calibration_statistics = {"fc.weight": {"input_sq_norm": torch.tensor([4.0, 9.0, 0.0])}}
    assert torch.equal(shared.score(target), expected)
    with pytest.raises(ValueError, match="no calibration statistics"):
        Wanda().score(target)


def test_keep_per_row_and_n_of_m():
    scores = torch.tensor([[3.0, 1.0, 1.0, 2.0], [0.0, 5.0, 4.0, 9.0]])
    assert keep_per_row(scores, 2).tolist() == [[True, False, False, True], [False, True, False, True]]
    assert keep_n_of_m(scores, 1, 2).tolist() == [[True, False, False, True], [False, True, False, True]]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2)]), st.integers(0, 99))
def test_n_of_m_keeps_exactly_n_of_every_m(rows, groups, nm, seed):
    n, m = nm
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, groups * m, generator=gen)
    x = torch.randn(64, groups * m, generator=gen)
    for keep in (wanda_keep(weight, x.pow(2).sum(0), 0.0, nm), sparsegpt_prune(weight, 2 * x.T @ x, nm=nm)[1]):
        assert (keep.reshape(rows, groups, m).sum(-1) == n).all()
    new, keep = sparsegpt_prune(weight, 2 * x.T @ x, nm=nm)
    assert (new[~keep] == 0).all()


def reference_sparsegpt(weight, hessian, sparsity=0.5, nm=None, block=128):
    """The published algorithm written plainly: float64, the OBS update applied to every remaining column
    at once (no lazy blocks), the mask of each 128-column block chosen when it is reached."""
    w = weight.double().clone()
    h = hessian.double().clone()
    cols = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += 0.01 * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for j in range(cols):
        if nm is None and j % block == 0:
            end = min(j + block, cols)
            saliency = (w[:, j:end] ** 2 / u.diagonal()[j:end] ** 2).flatten()
            count = round(saliency.numel() * sparsity)
            chosen = torch.sort(saliency, stable=True).indices[:count]
            flat = torch.zeros(saliency.numel(), dtype=torch.bool)
            flat[chosen] = True
            pruned[:, j:end] = flat.view(w.shape[0], end - j)
        if nm is not None and j % nm[1] == 0:
            saliency = w[:, j : j + nm[1]] ** 2 / u.diagonal()[j : j + nm[1]] ** 2
            order = torch.sort(saliency, dim=1, stable=True).indices[:, : nm[1] - nm[0]]
            pruned[:, j : j + nm[1]].scatter_(1, order, True)
        error = torch.where(pruned[:, j], w[:, j], 0.0) / u[j, j]
        w[:, j:] -= error[:, None] * u[j, j:][None, :]
    w[pruned] = 0
    return w, ~pruned


def correlated_inputs(features, tokens, seed=0):
    """Features driven by a few latent factors plus noise, with scales spread over two decades (as LLM
    activations have outlier features): strongly correlated columns."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, features // 8, generator=gen) @ torch.randn(features // 8, features, generator=gen)
    scales = torch.logspace(-1, 1, features)[torch.randperm(features, generator=gen)]
    return (latent + 0.3 * torch.randn(tokens, features, generator=gen)) * scales


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_matches_reference(nm):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 300, generator=gen)
    x = correlated_inputs(300, 2000)
    x[:, 7] = 0  # a dead input
    hessian = 2 * x.T @ x / x.shape[0]
    new, keep = sparsegpt_prune(weight, hessian, 0.5, nm)
    ref_w, ref_keep = reference_sparsegpt(weight, hessian, 0.5, nm)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new.double(), ref_w, rtol=1e-3, atol=1e-4)
    assert new.dtype == weight.dtype and not keep[:, 7].any()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsegpt_block_selection_breaks_ties_like_a_stable_sort(sparsity):
    """With H = 2I every column has the same U_jj and no OBS update reaches other columns, so each block's
    mask is its lowest w² in row-major order, earlier position first among equal values (weights drawn
    from 5 values: many ties, and the cut falls inside a run of equal ones)."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randint(-2, 3, (16, 300), generator=gen).float()
    _, keep = sparsegpt_prune(weight, 2 * torch.eye(300), sparsity)
    for start in range(0, 300, 128):
        block = weight[:, start : start + 128]
        count = round(block.numel() * sparsity)
        expected = torch.zeros(block.numel(), dtype=torch.bool)
        expected[torch.sort(block.square().flatten(), stable=True).indices[:count]] = True
        assert torch.equal(~keep[:, start : start + 128], expected.view_as(block))
    weight[0, 0] = float("nan")  # a NaN saliency orders last, as in a sort: it is never among the lowest
    _, with_nan = sparsegpt_prune(weight, 2 * torch.eye(300), sparsity)
    assert with_nan[0, 0] and torch.equal(with_nan[:, 128:], keep[:, 128:])
    assert int((~with_nan[:, :128]).sum()) == round(16 * 128 * sparsity)


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(64, 256, generator=gen)
    x = correlated_inputs(256, 4096, seed=3)
    hessian = 2 * x.T @ x / x.shape[0]

    def error(w):
        return float((x @ (weight - w).T).norm())

    new, keep = sparsegpt_prune(weight, hessian, 0.5)
    wanda = weight * wanda_keep(weight, x.pow(2).sum(0), 0.5)
    magnitude = weight * keep_per_row(weight.abs().reshape(1, -1), weight.numel() // 2).view_as(weight)
    assert abs(1 - keep.float().mean()) - 0.5 < 1e-6
    assert error(new) < 0.8 * error(wanda) < 0.5 * error(magnitude)


def test_sparsegpt_warns_and_prunes_without_update_when_cholesky_fails():
    weight = torch.randn(4, 8)
    hessian = -torch.eye(8)  # not positive definite whatever the (relative) damping
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        new, keep = sparsegpt_prune(weight, hessian, 0.5, name="bad")
    assert keep.sum() == 16 and torch.equal(new[keep], weight[keep])


def test_sparsegpt_raises_damping_before_giving_up():
    x = torch.randn(3, 16)  # 3 tokens, 16 inputs: H has rank 3, damped it is positive definite
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new, keep = sparsegpt_prune(torch.randn(4, 16), 2 * x.T @ x, 0.5)
    assert torch.isfinite(new).all() and int(keep.sum()) == 32


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0, 0.2), min_size=2, max_size=12),
    st.data(),
    st.floats(0.16, 0.84),
)
def test_owl_sparsities_bounded_exact_and_monotone(ratios, data, target):
    sizes = data.draw(st.lists(st.integers(1, 1000), min_size=len(ratios), max_size=len(ratios)))
    sparsities = owl_sparsities(ratios, sizes, target)
    assert all(abs(s - target) <= 2 * 0.08 + 1e-9 and 0 <= s < 1 for s in sparsities)
    if max(ratios) > min(ratios):  # the paper's min-max map: the block sparsities span exactly 2λ
        assert max(sparsities) - min(sparsities) == pytest.approx(2 * 0.08, abs=1e-9)
    total = sum(s * n for s, n in zip(sparsities, sizes)) / sum(sizes)
    assert total == pytest.approx(target, abs=1e-9)
    for i in range(len(ratios)):
        for j in range(len(ratios)):
            if ratios[i] > ratios[j]:
                assert sparsities[i] <= sparsities[j] + 1e-12


def test_owl_by_hand():
    # ratios 0.01, 0.03 → min-max onto [0, 2λ] = [0, 0.16] → centred: ∓0.08 → sparsities 0.78, 0.62
    assert owl_sparsities([0.01, 0.03], [10, 10], 0.7) == pytest.approx([0.78, 0.62])
    assert owl_sparsities([0.05, 0.05, 0.05], [1, 2, 3], 0.5) == [0.5, 0.5, 0.5]
    # ratios 1, 1, 4 (equal sizes) → [0, 0, 0.16], mean 0.16/3: the outlier-rich block goes 2λ·2/3 below S,
    # the others 2λ/3 above (the reference code's map; a max-deviation map would give -0.08 / +0.04)
    assert owl_sparsities([1.0, 1.0, 4.0], [5, 5, 5], 0.6) == pytest.approx([0.6 + 0.16 / 3] * 2 + [0.6 - 0.32 / 3])
    # unequal sizes: centred on the parameter-weighted mean, so the total is exact: r = [0, 0.16], weights
    # 3/4, 1/4 → mean 0.04 → sparsities 0.64, 0.48; 3·0.64 + 0.48 = 4·0.6
    assert owl_sparsities([0.0, 2.0], [30, 10], 0.6) == pytest.approx([0.64, 0.48])
    # λ is a parameter; a target without room for ±2λ is refused
    assert owl_sparsities([0.0, 1.0], [1, 1], 0.5, spread=0.04) == pytest.approx([0.54, 0.46])
    with pytest.raises(ValueError, match="leave"):
        owl_sparsities([0.0, 0.0, 1.0], [1, 1, 1], 0.1)


def test_outlier_ratio_uses_one_threshold_over_all_the_tensors_together():
    small, large = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([10.0, 10.0, 10.0, 50.0])
    # together: mean 84/8 = 10.5; M = 3 → threshold 31.5: only the 50 is above → 1/8.
    assert outlier_ratio(lambda: [small, large], 3.0) == 1 / 8
    # `large` against its own mean (20): 50 < 3·20, no outlier
    assert outlier_ratio(lambda: [large], 3.0) == 0.0
    assert outlier_ratio(lambda: [small, large], 0.5) == 4 / 8  # above 5.25: all of `large`


def test_owl_options_are_validated():
    assert pk.OWL() == pk.OWL(5, 0.08) and pk.OWL(outlier_multiplier=3).spread == 0.08
    for bad in (dict(outlier_multiplier=0), dict(outlier_multiplier=True), dict(spread=-0.1), dict(spread=0.3),
                dict(spread=float("nan")), dict(outlier_multiplier="5")):  # fmt: skip
        with pytest.raises(ValueError, match="OWL"):
            pk.OWL(**bad)
    pk.OWL(spread=0.1).check_target(0.2)
    with pytest.raises(ValueError, match=r"sparsity in \[0.2, 0.8\]"):
        pk.OWL(spread=0.1).check_target(0.15)


def test_wanda_with_statistics_is_a_plain_criterion_for_the_pruner():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0]]))
    stats = {"0.weight": torch.tensor([100.0, 0.0, 1.0, 1.0])}
    structured = copy.deepcopy(model)
    pk.prune(model, sparsity=0.25, criterion=Wanda(stats))  # scores [10 0 1 1], [20 0 2 2], [30 0 3 3]
    assert pk.masked_parameters(model)["0.weight"].tolist() == [[True, False, True, True]] * 3
    pk.prune(structured, sparsity=1 / 3, criterion=Wanda(stats), granularity="out_channel")  # row sums 12, 24, 36
    assert pk.masked_parameters(structured)["0.weight"].any(1).tolist() == [False, True, True]
