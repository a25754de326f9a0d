"""Schedules: pruning events and the sparsity asked for at each step."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import prunekit as pk

# ---------------------------------------------------------------------------- OneShot


def test_oneshot_default_prunes_at_step_zero():
    schedule = pk.OneShot()
    assert schedule.events() == [0]
    assert schedule.last_event == 0
    assert schedule.initial == 0.0
    assert schedule.sparsity_at(0, 0.9) == 0.9


def test_oneshot_at_step():
    schedule = pk.OneShot(at=5)
    assert schedule.events() == [5]
    assert schedule.next_event(-1) == 5
    assert schedule.next_event(4) == 5
    assert schedule.next_event(5) is None
    assert schedule.sparsity_at(4, 0.9) == 0.0
    assert schedule.sparsity_at(5, 0.9) == 0.9
    assert schedule.sparsity_at(1000, 0.9) == 0.9
    assert schedule.last_event == 5


# ---------------------------------------------------------------------------- Iterative


def test_iterative_event_steps():
    assert pk.Iterative(0, 10, 3).events() == [0, 5, 10]
    assert pk.Iterative(0, 9, 4).events() == [0, 3, 6, 9]
    # round(10/3) = 3, round(20/3) = 7
    assert pk.Iterative(0, 10, 4).events() == [0, 3, 7, 10]
    assert pk.Iterative(7, 7, 1).events() == [7]
    assert pk.Iterative(2, 50, 1).events() == [2]
    assert pk.Iterative(0, 2, 3).events() == [0, 1, 2]
    assert pk.Iterative(0, 10, 3).last_event == 10


def test_iterative_next_event():
    schedule = pk.Iterative(2, 12, 3)  # events 2, 7, 12
    assert schedule.next_event(-1) == 2
    assert schedule.next_event(2) == 7
    assert schedule.next_event(6) == 7
    assert schedule.next_event(7) == 12
    assert schedule.next_event(12) is None


def test_iterative_geometric_sparsity():
    # 1 − (1 − 0.875)^(r/3) = 1 − 0.5^r: 0.5, 0.75, 0.875.
    schedule = pk.Iterative(2, 12, 3)
    final = 0.875
    assert schedule.sparsity_at(0, final) == 0.0
    assert schedule.sparsity_at(1, final) == 0.0
    assert schedule.sparsity_at(2, final) == pytest.approx(0.5)
    assert schedule.sparsity_at(6, final) == pytest.approx(0.5)
    assert schedule.sparsity_at(7, final) == pytest.approx(0.75)
    assert schedule.sparsity_at(11, final) == pytest.approx(0.75)
    assert schedule.sparsity_at(12, final) == pytest.approx(0.875)
    assert schedule.sparsity_at(100, final) == pytest.approx(0.875)


def test_iterative_prunes_same_fraction_of_remaining_each_round():
    schedule = pk.Iterative(0, 40, 5)
    final = 0.9
    remaining = [1.0 - schedule.sparsity_at(step, final) for step in schedule.events()]
    ratios = [remaining[0]] + [b / a for a, b in zip(remaining, remaining[1:])]
    for ratio in ratios:
        assert ratio == pytest.approx(0.1 ** (1 / 5))


def test_iterative_per_round():
    schedule, final = pk.Iterative.per_round(0.2, rounds=3, start=0, every=10)
    assert isinstance(schedule, pk.Iterative)
    assert schedule.events() == [0, 10, 20]
    assert final == pytest.approx(1 - 0.8**3)  # 0.488
    # Each round removes 20% of what is left.
    assert schedule.sparsity_at(0, final) == pytest.approx(0.2)
    assert schedule.sparsity_at(10, final) == pytest.approx(0.36)
    assert schedule.sparsity_at(20, final) == pytest.approx(0.488)


def test_iterative_per_round_offset_start():
    schedule, final = pk.Iterative.per_round(0.5, rounds=4, start=100, every=25)
    assert schedule.events() == [100, 125, 150, 175]
    assert final == pytest.approx(0.9375)


# ---------------------------------------------------------------------------- Gradual


def test_gradual_cubic_matches_zhu_gupta():
    # s_t = s_f + (s_i − s_f)(1 − (t − t0)/(n Δt))³ with t0 = 0, n Δt = 100, s_i = 0, s_f = 0.9.
    schedule = pk.Gradual(start=0, end=100, every=10)
    assert schedule.curve == "cubic"
    assert schedule.sparsity_at(0, 0.9) == 0.0
    assert schedule.sparsity_at(10, 0.9) == pytest.approx(0.9 - 0.9 * 0.729)  # 0.2439
    assert schedule.sparsity_at(50, 0.9) == pytest.approx(0.7875)
    assert schedule.sparsity_at(90, 0.9) == pytest.approx(0.8991)
    assert schedule.sparsity_at(100, 0.9) == 0.9
    assert schedule.sparsity_at(150, 0.9) == 0.9


def test_gradual_cubic_with_initial_and_offset():
    schedule = pk.Gradual(start=100, end=300, every=50, initial=0.2)
    assert schedule.initial == 0.2
    assert schedule.sparsity_at(99, 0.9) == 0.0
    assert schedule.sparsity_at(100, 0.9) == pytest.approx(0.2)
    # p = 0.5: 0.9 + (0.2 − 0.9)·0.125 = 0.8125
    assert schedule.sparsity_at(200, 0.9) == pytest.approx(0.8125)
    assert schedule.sparsity_at(300, 0.9) == 0.9
    # An explicit initial overrides the schedule's own.
    assert schedule.sparsity_at(200, 0.9, initial=0.0) == pytest.approx(0.7875)


def test_gradual_linear():
    schedule = pk.Gradual(0, 100, every=25, curve="linear")
    assert schedule.sparsity_at(0, 0.9) == 0.0
    assert schedule.sparsity_at(25, 0.9) == pytest.approx(0.225)
    assert schedule.sparsity_at(50, 0.9) == pytest.approx(0.45)
    assert schedule.sparsity_at(100, 0.9) == 0.9
    with_initial = pk.Gradual(0, 100, every=25, initial=0.1, curve="linear")
    assert with_initial.sparsity_at(25, 0.9) == pytest.approx(0.3)


def test_gradual_cosine():
    schedule = pk.Gradual(0, 100, every=25, curve="cosine")
    assert schedule.sparsity_at(0, 0.9) == pytest.approx(0.0)
    # 0.9 − 0.9·(1 + cos(π/4))/2
    assert schedule.sparsity_at(25, 0.9) == pytest.approx(0.9 * (1 - (1 + math.sqrt(0.5)) / 2))
    assert schedule.sparsity_at(25, 0.9) == pytest.approx(0.13180195)
    assert schedule.sparsity_at(50, 0.9) == pytest.approx(0.45)
    assert schedule.sparsity_at(100, 0.9) == 0.9


def test_gradual_events_on_grid():
    assert pk.Gradual(0, 100, every=10).events() == list(range(0, 101, 10))
    assert pk.Gradual(0, 100, every=10).last_event == 100


def test_gradual_events_include_end_off_grid():
    assert pk.Gradual(0, 95, every=10).events() == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95]
    assert pk.Gradual(5, 30, every=10).events() == [5, 15, 25, 30]
    assert pk.Gradual(0, 3, every=100).events() == [0, 3]


def test_gradual_start_equals_end():
    schedule = pk.Gradual(7, 7)
    assert schedule.events() == [7]
    assert schedule.sparsity_at(6, 0.5) == 0.0
    assert schedule.sparsity_at(7, 0.5) == 0.5


def test_gradual_next_event():
    schedule = pk.Gradual(5, 30, every=10)
    assert schedule.next_event(-1) == 5
    assert schedule.next_event(4) == 5
    assert schedule.next_event(5) == 15
    assert schedule.next_event(12) == 15
    assert schedule.next_event(25) == 30
    assert schedule.next_event(29) == 30
    assert schedule.next_event(30) is None


# ---------------------------------------------------------------------------- properties


@given(
    start=st.integers(0, 50),
    length=st.integers(0, 200),
    every=st.integers(1, 50),
    initial=st.floats(0.0, 0.98),
    extra=st.floats(0.0, 1.0),
    curve=st.sampled_from(["cubic", "linear", "cosine"]),
)
def test_gradual_sparsity_is_monotone(start, length, every, initial, extra, curve):
    final = initial + (0.99 - initial) * extra  # initial ≤ final < 1
    schedule = pk.Gradual(start, start + length, every=every, initial=initial, curve=curve)
    values = [schedule.sparsity_at(step, final) for step in range(0, start + length + 3)]
    for a, b in zip(values, values[1:]):
        assert b >= a - 1e-12
    assert values[-1] == final
    if length > 0:
        assert schedule.sparsity_at(start, final) == pytest.approx(initial)
    events = schedule.events()
    assert events[0] == start and events[-1] == start + length
    assert events == sorted(set(events))
    assert all(e == start + length or (e - start) % every == 0 for e in events)


@given(
    start=st.integers(0, 50),
    rounds=st.integers(1, 6),
    extra_span=st.integers(0, 60),
    final=st.floats(0.0, 0.99),
)
def test_iterative_sparsity_is_monotone(start, rounds, extra_span, final):
    end = start + rounds - 1 + extra_span
    schedule = pk.Iterative(start, end, rounds)
    events = schedule.events()
    assert len(events) == rounds
    assert events == sorted(set(events))
    assert events[0] == start and events[-1] == (end if rounds > 1 else start)
    values = [schedule.sparsity_at(step, final) for step in range(0, end + 3)]
    for a, b in zip(values, values[1:]):
        assert b >= a
    assert values[-1] == pytest.approx(final)


# ---------------------------------------------------------------------------- epochs_to_steps


def test_epochs_to_steps():
    assert pk.epochs_to_steps(2.5, 100) == 250
    assert pk.epochs_to_steps(3, 7) == 21
    assert pk.epochs_to_steps(0, 10) == 0
    assert pk.epochs_to_steps(1 / 3, 10) == 3
    assert pk.epochs_to_steps(0.26, 10) == 3
    assert isinstance(pk.epochs_to_steps(1.0, 10), int)


@pytest.mark.parametrize("epochs, steps_per_epoch", [(1, 0), (1, -5), (-1, 10)])
def test_epochs_to_steps_errors(epochs, steps_per_epoch):
    with pytest.raises(ValueError):
        pk.epochs_to_steps(epochs, steps_per_epoch)


# ---------------------------------------------------------------------------- validation


def test_end_before_start_raises():
    with pytest.raises(ValueError, match="end"):
        pk.Gradual(10, 5)
    with pytest.raises(ValueError, match="end"):
        pk.Iterative(10, 5, 2)


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "10"])
def test_gradual_bad_every(every):
    with pytest.raises(ValueError, match="every"):
        pk.Gradual(0, 10, every=every)


def test_gradual_bad_curve():
    with pytest.raises(ValueError, match="curve"):
        pk.Gradual(0, 10, curve="exponential")


@pytest.mark.parametrize("initial", [1.0, -0.1, 1.5, "0.1", True, None])
def test_gradual_bad_initial(initial):
    with pytest.raises(ValueError, match="initial"):
        pk.Gradual(0, 10, initial=initial)


@pytest.mark.parametrize(
    "make",
    [
        lambda: pk.Gradual(0.0, 10),
        lambda: pk.Gradual(0, 10.5),
        lambda: pk.Gradual("0", 10),
        lambda: pk.Iterative(0, 10.0, 2),
        lambda: pk.Iterative(True, 10, 2),
        lambda: pk.OneShot(at=1.5),
        lambda: pk.OneShot(at=True),
        lambda: pk.OneShot(at=None),
    ],
)
def test_non_integer_steps_raise_type_error(make):
    with pytest.raises(TypeError, match="optimizer steps"):
        make()


@pytest.mark.parametrize(
    "make", [lambda: pk.OneShot(at=-1), lambda: pk.Gradual(-5, 10), lambda: pk.Iterative(0, -1, 1)]
)
def test_negative_steps_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("rounds", [0, -2, 1.5, True])
def test_iterative_bad_rounds(rounds):
    with pytest.raises(ValueError, match="rounds"):
        pk.Iterative(0, 10, rounds)


def test_iterative_too_many_rounds_for_span():
    with pytest.raises(ValueError, match="rounds"):
        pk.Iterative(0, 1, 3)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.2])
def test_iterative_per_round_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        pk.Iterative.per_round(fraction, rounds=3, start=0, every=10)


def test_reprs_name_the_schedule():
    assert repr(pk.OneShot(at=3)) == "OneShot(at=3)"
    assert repr(pk.Iterative(0, 10, 3)) == "Iterative(start=0, end=10, rounds=3)"
    assert repr(pk.Gradual(0, 10, every=5)) == "Gradual(start=0, end=10, every=5, initial=0.0, curve='cubic')"
