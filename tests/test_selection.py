"""prune_lowest: exactly k pruned, the k lowest, ties toward earlier (layer, position), on both paths."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from prunekit.engines import selection
from prunekit.engines.selection import _float_key, _key_float, prune_lowest

# ---------------------------------------------------------------------------- helpers


def expected_keep(layers: list[list[float]], k: int) -> list[list[bool]]:
    """Reference answer: sort (score, layer, position) and prune the first k."""
    flat = [(score, li, pi) for li, layer in enumerate(layers) for pi, score in enumerate(layer)]
    pruned = {(li, pi) for _, li, pi in sorted(flat)[:k]}
    return [[(li, pi) not in pruned for pi in range(len(layer))] for li, layer in enumerate(layers)]


def run(layers: list[list[float]], k: int) -> list[list[bool]]:
    tensors = [torch.tensor(layer, dtype=torch.float32) for layer in layers]
    score_fns = [lambda t=t: t for t in tensors]
    masks = prune_lowest(score_fns, [len(layer) for layer in layers], k)
    assert len(masks) == len(layers)
    for mask, layer in zip(masks, layers):
        assert mask.dtype == torch.bool
        assert mask.shape == (len(layer),)
    return [mask.tolist() for mask in masks]


@contextmanager
def chunked_path(sample_size: int = 64, candidate_limit: int = 50):
    """Force the no-concatenation path with a tiny sample and candidate budget (so _narrow runs too)."""
    with selection.tuned(sort_limit=0, sample_size=sample_size, candidate_limit=candidate_limit) as tuning:
        yield tuning


@contextmanager
def counting_narrow():
    """Count the calls of selection._narrow (still running the real one)."""
    calls = []
    real = selection._narrow

    def spy(*args, **kwargs):
        calls.append(args[2:])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selection, "_narrow", spy)
        yield calls


def float32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


# A mix of distinct floats, repeated integers (ties), signed zeros and infinities, all float32-exact.
any_score = st.one_of(
    st.floats(-1e6, 1e6, width=32),
    st.integers(-3, 3).map(float),
    st.sampled_from([0.0, -0.0, math.inf, -math.inf]),
)
tie_score = st.integers(-2, 2).map(float)


@st.composite
def layers_and_k(draw, score=any_score, max_layers=5, max_size=40):
    sizes = draw(st.lists(st.integers(1, max_size), min_size=1, max_size=max_layers))
    layers = [draw(st.lists(score, min_size=n, max_size=n)) for n in sizes]
    k = draw(st.integers(0, sum(sizes)))
    return layers, k


def check(layers, k):
    got = run(layers, k)
    assert sum(len(m) - sum(m) for m in got) == k
    assert got == expected_keep(layers, k)
    return got


# ---------------------------------------------------------------------------- sort path


def test_simple_example_across_layers():
    layers = [[5.0, 1.0, 3.0], [2.0, 4.0]]
    assert run(layers, 2) == [[True, False, True], [False, True]]
    assert run(layers, 3) == [[True, False, False], [False, True]]


def test_ties_go_to_earlier_layer_then_position():
    layers = [[1.0, 0.0, 1.0], [0.0, 1.0]]
    assert run(layers, 1) == [[True, False, True], [True, True]]
    assert run(layers, 2) == [[True, False, True], [False, True]]
    assert run(layers, 3) == [[False, False, True], [False, True]]
    assert run(layers, 4) == [[False, False, False], [False, True]]


def test_k_zero_and_total():
    layers = [[3.0, 1.0], [2.0]]
    assert run(layers, 0) == [[True, True], [True]]
    assert run(layers, 3) == [[False, False], [False]]


def test_k_out_of_range_raises():
    fns = [lambda: torch.zeros(3)]
    with pytest.raises(ValueError):
        prune_lowest(fns, [3], 4)
    with pytest.raises(ValueError):
        prune_lowest(fns, [3], -1)


def test_infinities_are_pruned_first_and_last():
    layers = [[math.inf, 0.0, -math.inf], [-math.inf, 5.0, math.inf]]
    assert run(layers, 2) == [[True, True, False], [False, True, True]]
    # -inf, -inf, 0, 5, then the first of the two +inf (layer 0 comes first).
    assert run(layers, 5) == [[False, False, False], [False, False, True]]


def test_negative_and_positive_zero_tie():
    layers = [[0.0, -0.0, 0.0], [-0.0]]
    assert run(layers, 2) == [[False, False, True], [True]]


@given(layers_and_k())
def test_sort_path_exact(case):
    check(*case)


@given(layers_and_k(score=tie_score))
def test_sort_path_exact_with_many_ties(case):
    check(*case)


# ---------------------------------------------------------------------------- chunked path


@given(layers_and_k(max_size=60))
def test_chunked_path_matches_reference(case):
    layers, k = case
    sort_result = run(layers, k)
    with chunked_path():
        chunked = check(layers, k)
    assert chunked == sort_result


@given(layers_and_k(score=tie_score, max_size=80))
def test_chunked_path_with_integer_ties(case):
    layers, k = case
    with chunked_path():
        check(layers, k)


@given(
    layers_and_k(score=st.one_of(tie_score, st.sampled_from([math.inf, -math.inf, -0.0])), max_size=80),
)
def test_chunked_path_with_infinities_and_ties(case):
    layers, k = case
    with chunked_path():
        check(layers, k)


@pytest.mark.parametrize("value", [0.0, -1.5, math.inf, -math.inf])
@pytest.mark.parametrize("k", [0, 1, 37, 199, 200])
def test_chunked_path_all_equal(value, k):
    layers = [[value] * 120, [value] * 80]
    with chunked_path():
        got = check(layers, k)
    # All equal: the first k in (layer, position) order go.
    flat = [x for mask in got for x in mask]
    assert flat == [False] * k + [True] * (200 - k)


@pytest.mark.parametrize("k", [0, 1, 250, 499, 500])
def test_chunked_path_k_zero_to_total(k):
    generator = torch.Generator().manual_seed(1)
    layers = [torch.randn(n, generator=generator).tolist() for n in (100, 300, 100)]
    with chunked_path():
        check(layers, k)


def test_chunked_path_runs_narrow_and_stays_exact():
    # 3000 distinct scores and a candidate budget of 50: the sample bracket holds far more than 50
    # candidates, so the bisection must run.
    generator = torch.Generator().manual_seed(0)
    layers = [torch.randn(n, generator=generator).tolist() for n in (1000, 1500, 500)]
    for k in (1, 777, 1500, 2999, 3000):
        with chunked_path(), counting_narrow() as calls:
            check(layers, k)
        if k < 3000:
            assert calls, f"_narrow did not run for k={k}"


def test_chunked_path_narrow_with_integer_ties():
    # 4000 scores over 21 integer values: many ties at the threshold, bisection over the bit patterns.
    generator = torch.Generator().manual_seed(2)
    layers = [torch.randint(-10, 11, (n,), generator=generator).float().tolist() for n in (1500, 2500)]
    for k in (1, 100, 1999, 2000, 3999, 4000):
        with chunked_path(), counting_narrow():
            check(layers, k)


@pytest.mark.parametrize(
    "bracket",
    [
        (-math.inf, math.inf),  # no information
        (-math.inf, -math.inf),  # everything above the bracket
        (math.inf, math.inf),  # everything below the bracket
        (5.0, 6.0),  # v* below the bracket
        (-6.0, -5.0),  # v* above the bracket
        (0.0, 0.0),  # a single point
    ],
)
@pytest.mark.parametrize("k", [1, 300, 600, 1000])
def test_chunked_path_recovers_from_misleading_sample(bracket, k):
    generator = torch.Generator().manual_seed(3)
    layers = [(torch.randn(n, generator=generator) * 2).tolist() for n in (400, 600)]
    layers[0][:50] = [0.0] * 50  # ties at the single-point bracket
    layers[1][:5] = [-math.inf] * 5
    layers[1][5:10] = [math.inf] * 5
    with chunked_path(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(selection, "_sample_bracket", lambda *args: bracket)
        check(layers, k)


def test_chunked_path_score_fns_may_be_called_again():
    calls = [0, 0]
    generator = torch.Generator().manual_seed(4)
    a, b = torch.randn(200, generator=generator), torch.randn(300, generator=generator)

    def fa():
        calls[0] += 1
        return a.clone()

    def fb():
        calls[1] += 1
        return b.clone()

    with chunked_path():
        masks = prune_lowest([fa, fb], [200, 300], 123)
    assert calls[0] > 1 and calls[1] > 1
    got = [m.tolist() for m in masks]
    assert got == expected_keep([a.tolist(), b.tolist()], 123)


# ---------------------------------------------------------------------------- float keys


@given(st.floats(width=32, allow_nan=False), st.floats(width=32, allow_nan=False))
def test_float_key_order_matches_float_order(x, y):
    kx, ky = _float_key(x), _float_key(y)
    if x < y:
        assert kx < ky
    elif x > y:
        assert kx > ky
    assert _key_float(kx) == x and math.copysign(1.0, _key_float(kx)) == math.copysign(1.0, x)


def test_float_key_extremes():
    assert _float_key(-math.inf) < _float_key(-3.4e38) < _float_key(-0.0) < _float_key(0.0) < _float_key(math.inf)
    assert _key_float(_float_key(float32(0.1))) == float32(0.1)


def test_empty_layer_on_both_paths():
    # A layer with no units (e.g. a Linear with 0 inputs) must not break either path.
    layers = [[3.0, 1.0, 2.0, 0.5] * 20, [], [1.5, 0.25] * 10]
    expected = expected_keep(layers, 30)
    assert run(layers, 30) == expected
    with chunked_path():
        assert run(layers, 30) == expected


# ---------------------------------------------------------------------------- find_cut / min_kept


def expected_keep_min_kept(layers: list[list[float]], k: int, min_kept: int) -> list[list[bool]]:
    """Reference with min_kept, for distinct scores: every layer's min_kept best are off limits."""
    total = sum(len(layer) for layer in layers)
    k = min(k, total - sum(min(min_kept, len(layer)) for layer in layers))
    protected = set()
    for li, layer in enumerate(layers):
        best = sorted(range(len(layer)), key=lambda pi: layer[pi], reverse=True)[:min_kept]
        protected.update((li, pi) for pi in best)
    flat = [(s, li, pi) for li, layer in enumerate(layers) for pi, s in enumerate(layer) if (li, pi) not in protected]
    pruned = {(li, pi) for _, li, pi in sorted(flat)[:k]}
    return [[(li, pi) not in pruned for pi in range(len(layer))] for li, layer in enumerate(layers)]


def run_cut(layers: list[list[float]], k: int, min_kept: int = 0, use_scratch: bool = False) -> list[list[bool]]:
    """Drive find_cut + Cut.keep the way the pruner does; with use_scratch the score functions write
    into the scratch buffer they are given (as the pruner's magnitude fast path does)."""
    tensors = [torch.tensor(layer, dtype=torch.float32) for layer in layers]

    def make(t):
        def fn(out):
            if use_scratch and out is not None:
                return torch.abs(t, out=out[: t.numel()]).copy_(t)
            return t.clone()

        return fn

    fns = [make(t) for t in tensors]
    sizes = [len(layer) for layer in layers]
    cut = selection.find_cut(fns, sizes, k, min_kept)
    scratch = torch.empty(max(sizes)) if use_scratch else None
    return [cut.keep(i, fn(scratch)).tolist() for i, fn in enumerate(fns)]


@st.composite
def distinct_layers(draw, max_layers=4, max_size=30):
    sizes = draw(st.lists(st.integers(1, max_size), min_size=1, max_size=max_layers))
    values = draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=sum(sizes), max_size=sum(sizes), unique=True))
    layers, start = [], 0
    for n in sizes:
        layers.append(values[start : start + n])
        start += n
    return layers, draw(st.integers(0, sum(sizes))), draw(st.integers(0, 4))


@given(distinct_layers())
def test_find_cut_min_kept_sort_path(case):
    layers, k, min_kept = case
    got = run_cut(layers, k, min_kept)
    assert got == expected_keep_min_kept(layers, k, min_kept)
    for mask, layer in zip(got, layers):
        assert sum(mask) >= min(min_kept, len(layer))


@given(distinct_layers(max_size=60), st.booleans())
def test_find_cut_min_kept_chunked_path(case, use_scratch):
    layers, k, min_kept = case
    with chunked_path():
        got = run_cut(layers, k, min_kept, use_scratch=use_scratch)
    assert got == expected_keep_min_kept(layers, k, min_kept)


def test_min_kept_keeps_each_layers_best():
    # Global pruning of 3 would empty layer 0; it keeps its best unit and layer 1 pays instead.
    layers = [[0.0, 0.5], [5.0, 6.0, 7.0]]
    assert run_cut(layers, 3, min_kept=1) == [[False, True], [False, False, True]]
    # With min_kept=0 the lowest three go, whatever the layer.
    assert run_cut(layers, 3, min_kept=0) == [[False, False], [False, True, True]]
    # k is capped at total − guaranteed: 5 − 2 = 3 at most.
    assert run_cut(layers, 5, min_kept=1) == [[False, True], [False, False, True]]


@given(layers_and_k(score=tie_score, max_size=30), st.integers(1, 3), st.booleans())
def test_non_binding_min_kept_changes_nothing(case, min_kept, chunked):
    # When no layer would keep fewer than min_kept units anyway, min_kept must not change the
    # answer, ties included (ties still go to the earlier (layer, position) first).
    layers, k = case
    unconstrained = expected_keep(layers, k)
    if any(sum(mask) < min(min_kept, len(mask)) for mask in unconstrained):
        return
    if chunked:
        with chunked_path():
            got = run_cut(layers, k, min_kept)
    else:
        got = run_cut(layers, k, min_kept)
    assert got == unconstrained


def test_non_binding_min_kept_with_all_equal_scores():
    assert run_cut([[1.0, 1.0, 1.0]], 1, min_kept=0) == [[False, True, True]]
    assert run_cut([[1.0, 1.0, 1.0]], 1, min_kept=1) == [[False, True, True]]


@pytest.mark.parametrize("chunked", [False, True])
def test_min_kept_holds_with_genuine_infinite_scores(chunked):
    # Units that really score +inf must not be confused with protected ones: no layer is emptied.
    layers = [[math.inf], [math.inf, math.inf]]
    if chunked:
        with chunked_path():
            got = run_cut(layers, 1, min_kept=1)
    else:
        got = run_cut(layers, 1, min_kept=1)
    assert sum(len(m) - sum(m) for m in got) == 1
    assert all(sum(m) >= 1 for m in got)


def test_find_cut_k_zero_keeps_everything_even_minus_inf():
    layers = [[-math.inf, 1.0], [2.0]]
    assert run_cut(layers, 0) == [[True, True], [True]]
    with chunked_path():
        assert run_cut(layers, 0) == [[True, True], [True]]


# ---------------------------------------------------------------------------- counting pass pieces


@given(st.integers(0, 200), st.floats(0.0, 0.2), st.integers(0, 7), st.integers(0, 2**31))
def test_select_matches_boolean_indexing(n, density, offset, seed):
    # Both ways: 8 flags at a time (forced even for short masks) and plain indexing.
    with selection.tuned(select_by_words_from=0):
        check_select(n, density, offset, seed)
    check_select(n, density, offset, seed)


def check_select(n, density, offset, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n + offset, generator=generator)[offset:]
    mask = torch.rand(n + offset, generator=generator)[offset:] < density
    assert torch.equal(selection._select(values, mask), values[mask])
    assert torch.equal(selection._positions(mask), mask.nonzero().squeeze(1))


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("seed", range(5))
def test_sample_bracket_holds_the_quantile_when_runs_are_alike(q, seed):
    # Every run of 16 consecutive units shares one value (like a filter's weights, only more so) and
    # the layers differ in scale: a margin for independent units would be far too narrow.
    generator = torch.Generator().manual_seed(seed)
    layers = [torch.randn(n // 16, generator=generator).repeat_interleave(16) * scale for n, scale in
              ((16_000, 1.0), (64_000, 0.1), (4_000, 3.0))]  # fmt: skip
    fns = [lambda out, t=t: t for t in layers]
    sizes = [t.numel() for t in layers]
    everything = torch.cat(layers)
    k = round(q * everything.numel())
    truth = float(everything.kthvalue(k).values)
    with selection.tuned(sample_size=16384):  # 1024 runs
        lo, hi = selection._sample_bracket(*selection._sample(fns, sizes, None), k / everything.numel())
    assert lo <= truth <= hi
    # and still narrow: about ±6σ of 1024 independent draws (σ ≤ 0.5/32), not the whole range
    assert float(((everything >= lo) & (everything <= hi)).float().mean()) < 0.25
