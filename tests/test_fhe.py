"""FHE-ready pruning (issue #5): Ω arithmetic, the per-neuron fan-in cap, the exact budget, the
accumulator report, and every error leaving the model unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit.fhe import AccumulatorBudget, Quantization, accumulator_report, max_fan_in, neuron_fan_in


def linear_with(rows: list[list[float]]) -> nn.Linear:
    weight = torch.tensor(rows)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def fan_ins(model: nn.Module) -> dict[str, list[int]]:
    return {
        name: neuron_fan_in(module, module.weight.detach()).tolist()
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    }


# ---------------------------------------------------------------------------- Ω


@pytest.mark.parametrize(
    "weight_bits, input_bits, accumulator_bits, omega",
    [
        (2, 2, 16, 7281),  # 65535 // (3·3)
        (4, 4, 16, 291),  # 65535 // (15·15)
        (8, 8, 16, 1),  # 65535 // 65025
        (1, 1, 1, 1),  # 1 // 1
        (3, 2, 8, 12),  # 255 // (7·3)
        (6, 6, 16, 16),  # 65535 // 3969
    ],
)
def test_max_fan_in_matches_hand_computation(weight_bits, input_bits, accumulator_bits, omega):
    assert max_fan_in(weight_bits, input_bits, accumulator_bits) == omega


def test_max_fan_in_defaults_to_a_16_bit_accumulator():
    assert max_fan_in(2, 2) == 7281


@pytest.mark.parametrize("bits", [(0, 2, 16), (2, 0, 16), (2, 2, 0), (-1, 2, 16)])
def test_max_fan_in_rejects_bit_widths_below_one(bits):
    with pytest.raises(ValueError, match="at least 1 bit"):
        max_fan_in(*bits)


@pytest.mark.parametrize("bad", [2.0, True, "2", None])
def test_max_fan_in_rejects_non_integer_bits(bad):
    with pytest.raises(TypeError, match="whole number of bits"):
        max_fan_in(bad, 2, 16)


def test_max_fan_in_zero_says_how_many_accumulator_bits_are_needed():
    # (2^8 − 1)² = 65025 needs 16 bits; 15 cannot hold one product.
    with pytest.raises(ValueError, match=r"Ω = 0.*at least 16 accumulator bits"):
        max_fan_in(8, 8, 15)


# ---------------------------------------------------------------------------- the cap


def test_cap_keeps_the_largest_weights_of_each_neuron():
    layer = linear_with([[1.0, -4.0, 2.0, 3.0], [0.5, 0.1, -0.2, 5.0]])
    pk.prune(layer, max_fan_in=2)
    assert layer.weight.tolist() == [[0.0, -4.0, 0.0, 3.0], [0.5, 0.0, 0.0, 5.0]]


def test_conv_fan_in_counts_channels_times_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    pk.prune(conv, max_fan_in=5)
    assert neuron_fan_in(conv, conv.weight).tolist() == [5, 5, 5, 5]  # of 3·3·3 = 27 each
    report = accumulator_report(conv, 2, 2)
    assert report.layers[0].fan_in == 27 and report.layers[0].max_nonzero == 5


def test_grouped_and_transposed_convs_are_capped_per_output_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ConvTranspose2d(6, 4, 2))
    pk.prune(model, max_fan_in=4)
    grouped = model[0].weight.detach()  # (6, 2, 3, 3): fan-in 2·9 = 18
    assert (grouped != 0).reshape(6, -1).sum(1).max() == 4
    transposed = model[1].weight.detach()  # (in 6, out 4, 2, 2): output channel o sums over W[:, o]
    assert (transposed != 0).transpose(0, 1).reshape(4, -1).sum(1).max() == 4


def test_stricter_of_sparsity_and_cap_wins():
    torch.manual_seed(0)
    layer = nn.Linear(10, 4)
    loose_cap = copy.deepcopy(layer)
    pk.prune(loose_cap, sparsity=0.9, max_fan_in=8)  # 4 of 40 weights kept: sparsity is stricter
    assert int((loose_cap.weight != 0).sum()) == 4
    tight_cap = copy.deepcopy(layer)
    pk.prune(tight_cap, sparsity=0.1, max_fan_in=2)  # 36 allowed, but 2 per neuron: the cap is stricter
    assert fan_ins(tight_cap)[""] == [2, 2, 2, 2]


def test_sparsity_may_be_left_out_when_max_fan_in_is_given():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    pruner = pk.prune(model, max_fan_in=3)
    assert fan_ins(model) == {"0": [3] * 8, "2": [3] * 3}
    assert pruner.state_dict()["config"]["max_fan_in"] == 3
    with pytest.raises(TypeError, match="sparsity is required"):
        pk.Pruner(nn.Linear(4, 4))


def test_cap_combines_with_nm():
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    pk.prune(layer, granularity=pk.NM(2, 4), max_fan_in=5)
    kept = layer.weight.detach() != 0
    assert kept.sum(1).tolist() == [5, 5, 5, 5]
    assert kept.reshape(4, 4, 4).sum(-1).max() <= 2  # still 2:4


def _model(kind: str, out_dim: int, in_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Linear(out_dim, 3))
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 2), nn.ReLU(), nn.Conv2d(out_dim, 3, 1))


@given(
    kind=st.sampled_from(["linear", "conv"]),
    out_dim=st.integers(1, 12),
    in_dim=st.integers(1, 24),
    cap=st.integers(1, 30),
    sparsity=st.one_of(st.none(), st.floats(0.0, 0.95)),
    schedule=st.sampled_from(["oneshot", "oneshot-late", "gradual", "gradual-linear", "iterative"]),
    scope=st.sampled_from(["local", "global"]),
    seed=st.integers(0, 2**16),
)
def test_every_neuron_ends_within_the_cap(kind, out_dim, in_dim, cap, sparsity, schedule, scope, seed):
    torch.manual_seed(seed)
    model = _model(kind, out_dim, in_dim)
    schedules = {
        "oneshot": pk.OneShot(at=0),
        "oneshot-late": pk.OneShot(at=7),
        "gradual": pk.Gradual(start=2, end=20, every=3),
        "gradual-linear": pk.Gradual(start=0, end=12, every=5, curve="linear"),
        "iterative": pk.Iterative(start=0, end=18, rounds=4),
    }
    pruner = pk.Pruner(model, sparsity, max_fan_in=cap, schedule=schedules[schedule], scope=scope)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, in_dim) if kind == "linear" else torch.randn(4, in_dim, 3, 3)
    previous = None
    for _ in range(22):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
        now = fan_ins(model)
        if previous is not None:  # the allowance never grows back
            assert all(n <= p for name in now for n, p in zip(now[name], previous[name]))
        previous = now
    for name, counts in fan_ins(model).items():
        assert max(counts) <= cap, name
    if sparsity is not None and scope == "local":
        for module in (model[0], model[2]):
            # local sparsity rounds the number pruned per layer; the cap only prunes more
            pruned = int((module.weight == 0).sum())
            assert pruned >= round(sparsity * module.weight.numel()) - 1


def test_gradual_cap_tightens_with_the_schedule():
    torch.manual_seed(0)
    layer = nn.Linear(100, 6)
    pruner = pk.Pruner(layer, max_fan_in=10, schedule=pk.Gradual(start=0, end=100, every=25, curve="linear"))
    seen = []
    for _ in range(100):
        pruner.step()
        if pruner.step_count % 25 == 0:
            seen.append(max(fan_ins(layer)[""]))
    # linear from 100 to 10 inputs: after 25, 50, 75, 100 steps
    assert seen == [78, 55, 32, 10]


def test_fan_in_survives_state_dict_round_trip():
    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 4))

    def run(model, pruner, steps):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        pruner.attach_optimizer(optimizer)
        gen = torch.Generator().manual_seed(pruner.step_count)
        for _ in range(steps):
            x = torch.randn(8, 20, generator=gen)
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            pruner.step()

    schedule = pk.Gradual(start=0, end=30, every=5)
    model = make()
    pruner = pk.Pruner(model, max_fan_in=4, schedule=schedule)
    run(model, pruner, 12)
    saved_model, saved_pruner = copy.deepcopy(model.state_dict()), pruner.state_dict()

    resumed = make()
    resumed.load_state_dict(saved_model)
    resumed_pruner = pk.Pruner(resumed, max_fan_in=4, schedule=schedule)
    resumed_pruner.load_state_dict(saved_pruner)
    assert {k: v.tolist() for k, v in resumed_pruner.masks.items()} == {k: v.tolist() for k, v in pruner.masks.items()}
    run(resumed, resumed_pruner, 25)
    assert max(max(c) for c in fan_ins(resumed).values()) <= 4


# ---------------------------------------------------------------------------- exact budget


def test_exact_budget_keeps_weights_while_their_integers_fit():
    # 3-bit symmetric weights: scale = max|w| / 3 = 1, so the integers are the weights themselves.
    # 1-bit unsigned inputs: max|q_x| = 1. Budget 3 bits: Σ|q_w| ≤ 7. Ω = 7 // (7·1) = 1.
    layer = linear_with([[3.0, -1.0, 1.0, 2.0, 0.0], [3.0, 3.0, 3.0, -3.0, 1.0]])
    budget = AccumulatorBudget(weight_bits=3, input_bits=1, accumulator_bits=3)
    assert budget.omega == 1
    pk.prune(layer, max_fan_in=budget)
    # row 0: 3 + 2 + 1 + 1 = 7 fits, all four non-zeros stay; row 1: 3 + 3 = 6, a third 3 would make 9
    assert layer.weight.tolist() == [[3.0, -1.0, 1.0, 2.0, 0.0], [3.0, 3.0, 0.0, 0.0, 0.0]]
    with pytest.warns(UserWarning, match="lopsided"):  # 1 negative, 5 positive weights left
        report = accumulator_report(layer, 3, 1, 3)
    assert report.fits and report.layers[0].beyond_omega == (4 - 1) + (2 - 1)


def test_exact_budget_with_fixed_scale_and_signed_inputs():
    # 5-bit weights at scale 0.25: |q| = [4, 8, 12, 14]; 8-bit budget: Σ ≤ 255 (Ω = 255 // (31·7) = 1).
    # Signed 3-bit inputs (max|q_x| = 4): 56, 104, 136, 152 all fit. Unsigned (7): 98, 182, 238, then 266 > 255.
    signed = linear_with([[1.0, -2.0, 3.0, 3.5]])
    pk.prune(signed, max_fan_in=AccumulatorBudget(5, 3, 8, scale=0.25, input_signed=True))
    assert signed.weight.tolist() == [[1.0, -2.0, 3.0, 3.5]]
    unsigned = linear_with([[1.0, -2.0, 3.0, 3.5]])
    pk.prune(unsigned, max_fan_in=AccumulatorBudget(5, 3, 8, scale=0.25))
    assert unsigned.weight.tolist() == [[0.0, -2.0, 3.0, 3.5]]


def test_exact_budget_asymmetric_zero_point_that_cannot_fit_is_an_error():
    torch.manual_seed(0)
    model = nn.Linear(64, 4)
    before = copy.deepcopy(model.state_dict())
    budget = AccumulatorBudget(weight_bits=4, input_bits=4, accumulator_bits=10, symmetric=False, zero_point=8)
    with pytest.raises(ValueError, match="even with every weight pruned; use symmetric=True"):
        pk.prune(model, max_fan_in=budget)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pk.masked_parameters(model) == {}


# ---------------------------------------------------------------------------- report


def test_report_worst_case_and_observed_bits_by_hand():
    layer = linear_with([[3.0, -1.0, 1.0, 2.0, 0.0], [3.0, 3.0, 3.0, -3.0, 1.0]])
    # 3-bit symmetric weights keep their values; 2-bit unsigned inputs: max|q_x| = 3.
    # worst: row 0: 7·3 = 21 (5 bits), row 1: 13·3 = 39 (6 bits); budget 5 bits = 31; Ω = 31 // 21 = 1.
    calibration = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    report = accumulator_report(layer, 3, 2, 5, calibration=calibration)
    layer_report = report.layers[0]
    assert layer_report.worst_case == [21, 39]
    assert layer_report.worst_case_bits == 6 and layer_report.over_budget == 1
    assert layer_report.nonzero == [4, 5] and layer_report.beyond_omega == 3 + 4
    # inputs 1.0 are the integer 3: row 0: 3·5 = 15, row 1: 3·7 = 21 → 5 bits
    assert layer_report.observed == [15, 21] and layer_report.observed_bits == 5
    assert not report.fits and report.omega == 1
    text = str(report)
    assert "OVER BUDGET" in text and "worst bits" in text
    assert report.to_dict()["layers"][0]["worst_case"] == [21, 39]


def test_report_observed_conv_accumulators_match_an_integer_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.rand(4, 2, 5, 5)
    report = accumulator_report(conv, 4, 3, calibration=x)
    q_w = Quantization(4).integers(conv.weight).values.double()
    q_x = Quantization(3, symmetric=False).integers(x).values.double()  # zero point 0 for x ≥ 0
    expected = torch.nn.functional.conv2d(q_x, q_w, padding=1).abs().amax(dim=(0, 2, 3))
    assert report.layers[0].observed == expected.round().long().tolist()


def test_report_warns_when_asymmetric_weights_turn_pruned_zeros_into_integers():
    # 4-bit asymmetric over [−1, 1]: scale 2/15, zero point round(7.5) = 8
    layer = linear_with([[-1.0, 0.0, 0.0, 1.0], [0.5, 0.0, 0.0, 0.0]])
    with pytest.warns(UserWarning, match="zero weights to the integer 8"):
        report = accumulator_report(layer, 4, 4, symmetric=False)
    assert report.warnings and report.layers[0].max_nonzero == 2
    # every weight costs: row 0 |0|+8+8+15 = 31, row 1 12+8+8+8 = 36, times 15
    assert report.layers[0].worst_case == [31 * 15, 36 * 15]


def test_report_warns_when_concrete_ml_would_quantize_a_pruned_layer_asymmetrically():
    # 100 weights, 4 survivors all negative: the 97th percentile is 0, so Concrete ML's post-training
    # quantization would pick an asymmetric range and every pruned zero would become its zero point.
    weight = torch.zeros(4, 25)
    weight[:, 0] = -1.0
    with pytest.warns(UserWarning, match="lopsided for Concrete ML's post-training quantization"):
        report = accumulator_report(linear_with(weight.tolist()), 6, 6)
    assert "4 negative, 0 positive of 100" in report.warnings[0]
    balanced = torch.randn(4, 25)  # dense and symmetric: no warning
    assert not accumulator_report(linear_with(balanced.tolist()), 6, 6).warnings


def test_report_does_not_change_the_model_or_its_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.ReLU(), nn.Linear(5, 2)).train()
    before = copy.deepcopy(model.state_dict())
    accumulator_report(model, 4, 4, calibration=torch.randn(3, 6))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model[0]._forward_hooks


# ---------------------------------------------------------------------------- errors


def _unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and pk.masked_parameters(model) == {}


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"max_fan_in": 0}, ValueError, "at least 1 weight per neuron"),
        ({"max_fan_in": -3}, ValueError, "at least 1 weight per neuron"),
        ({"max_fan_in": 2.5}, TypeError, "whole number of weights per neuron"),
        ({"max_fan_in": True}, TypeError, "whole number of weights per neuron"),
        ({"max_fan_in": "7281"}, TypeError, "whole number of weights per neuron"),
        ({"max_fan_in": 3, "granularity": "out_channel"}, ValueError, "granularity='weight' or pk.NM"),
        ({"max_fan_in": 3, "granularity": pk.Block(2, 2)}, ValueError, "cannot express"),
        ({"max_fan_in": 3, "include": [nn.Embedding]}, ValueError, "exclude it"),
    ],
)
def test_bad_max_fan_in_raises_and_leaves_the_model_unchanged(options, error, message):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        pk.prune(model, **options)
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: AccumulatorBudget(0, 2), ValueError, "at least 1 bit"),
        (lambda: AccumulatorBudget(8, 8, 15), ValueError, "Ω = 0"),
        (lambda: AccumulatorBudget(2, 2, scale=-1.0), ValueError, "scale must be a positive number"),
        (lambda: AccumulatorBudget(2, 2, zero_point=1), ValueError, "symmetric=False to set a zero point"),
        (
            lambda: AccumulatorBudget(2, 2, symmetric=False, zero_point=4),
            ValueError,
            r"zero_point must lie in \[0, 3\]",
        ),
        (lambda: Quantization(1, narrow=True), ValueError, "narrow symmetric range needs at least 2 bits"),
        (lambda: Quantization(3, symmetric=False, zero_point=1.5), TypeError, "zero_point must be an integer"),
    ],
)
def test_bad_budgets_and_quantizations_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((0, 2), ValueError, "at least 1 bit"),
        ((2, 2, 1), ValueError, "Ω = 0"),
        ((2.0, 2), TypeError, "whole number of bits"),
    ],
)
def test_bad_report_arguments_are_refused(args, error, message):
    with pytest.raises(error, match=message):
        accumulator_report(nn.Linear(3, 2), *args)


def test_report_refuses_layers_without_an_accumulator():
    with pytest.raises(ValueError, match="no accumulator to check; exclude it"):
        accumulator_report(nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)), 2, 2, include=[nn.Embedding])
