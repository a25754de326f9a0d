"""Property-based fuzzing of the whole pipeline (issue 10): random small residual / concat / attention
networks (sequence MLPs with attention, and conv nets with BatchNorm) and random argument
combinations, valid and invalid.

Invariants checked on every example:

- a call with any invalid argument is refused (``ValueError`` / ``TypeError``) and leaves the model
  bit for bit as it was: state_dict, every buffer, hooks, ``requires_grad``, training flags;
- an accepted call prunes exactly the requested number of units: per layer (local scope) or over all
  layers (global scope), ``round(sparsity × units)`` less what ``min_kept`` protects; for coupled
  structured pruning the same count over coupled units (per family, or pooled);
- ``requires_grad`` is kept, and after an SGD step and ``pruner.step()`` every pruned entry is zero;
- no layer of these networks (all of which feed the output) is reported as affecting no output;
- with ``sparsity_in="params"``/``"macs"`` the requested fraction is saved, unless every family is at
  its ``min_kept`` cap;
- compaction equals the masked model (and keeps ``requires_grad``), or raises a
  :class:`prunekit.CompactionError` that names the module (naming the op as well is defect 11's);
  the compacted model round-trips through ``save_pruned``/``load_pruned`` bit for bit;
- through Iterative and Gradual schedules with SGD steps, masks only grow, pruned weights stay zero
  and the last event leaves exactly the final count; N:M keeps exactly n of every m.

Defects that other sessions are fixing are checked, xfail, in test_known_defects.py.
Examples are derandomized so that CI is reproducible; ``PRUNEKIT_FUZZ_SCALE=20`` runs twenty times
as many from fresh random seeds, to go looking for more.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
from fuzz_networks import networks
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from model_state import assert_unchanged, snapshot
from torch import nn

import prunekit as pk
from prunekit.structure.units import removed_units

#: PRUNEKIT_FUZZ_SCALE=25 (say) runs 25 times as many examples, from fresh random seeds, to go looking for defects.
SCALE = int(os.environ.get("PRUNEKIT_FUZZ_SCALE", "1"))
FUZZ = settings(
    max_examples=40 * SCALE,
    deadline=None,
    derandomize=SCALE == 1,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
)

# ---------------------------------------------------------------------------- arguments


GRANULARITIES = ["weight", "kernel", "out_channel", "in_channel"]
#: Invalid values for each argument, with the error each must raise.
INVALID = {
    "sparsity": [(-0.1, ValueError), (1.0, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                 ("0.5", TypeError), (True, TypeError)],
    "scope": [("globl", ValueError)],
    "criterion": [("magnitud", ValueError)],
    "granularity": [("filter", ValueError)],
    "min_kept": [(-1, ValueError), (1.5, ValueError)],
    "include": [(3, TypeError), (["no_such_layer"], ValueError), (["("], ValueError)],
    "exclude": [(["no_such_layer"], ValueError)],
    "layer_sparsity": [({1: 0.5}, TypeError), ({"no_such_layer": 0.5}, ValueError), ({"head": 1.2}, ValueError)],
    "round_to": [(0, ValueError)],
    "coupled": [("yes", TypeError)],
}  # fmt: skip
#: Flattened, and drawn by index, so that every invalid value comes up about as often.
INVALID_CASES = [(name, value, error) for name, values in INVALID.items() for value, error in values] + [
    ("NaN weight", None, ValueError),
    ("round_to outside coupled mode", None, ValueError),
]


@st.composite
def arguments(draw, model):
    """(kwargs, coupled, expected error or None, what is invalid)."""
    mode = draw(st.sampled_from(["weight", "kernel", "in_channel", "out_channel", "coupled", "coupled"]))
    coupled = mode == "coupled"
    kwargs = {
        "sparsity": draw(st.floats(0.0, 0.95)),
        "scope": draw(st.sampled_from(["local", "global"])),
        "criterion": draw(st.sampled_from(["magnitude", "l2", "random"])),
        "granularity": "out_channel" if coupled else mode,
        "min_kept": draw(st.integers(0, 2)),
    }
    if mode == "out_channel":
        kwargs["coupled"] = False
    if coupled:
        kwargs["round_to"] = draw(st.sampled_from([1, 1, 2]))
        kwargs["prune_outputs"] = draw(st.sampled_from([False, False, True]))
        kwargs["sparsity_in"] = draw(st.sampled_from(["channels", "channels", "params", "macs"]))
        kwargs["prune_only"] = draw(st.sampled_from([None, None, "width"]))
    if draw(st.integers(0, 3)):
        return kwargs, coupled, None, ""
    name, value, error = draw(st.randoms(use_true_random=False)).choice(INVALID_CASES)
    if name == "NaN weight":
        return kwargs, coupled, ValueError, name
    if name == "round_to outside coupled mode":
        if coupled:
            return kwargs, coupled, None, ""
        kwargs["round_to"] = 2
        return kwargs, coupled, ValueError, name
    kwargs[name] = value
    if name == "round_to" and not coupled:
        error = ValueError
    return kwargs, coupled, error, f"{name}={value!r}"


def _call(model, x, kwargs, coupled):
    options = dict(kwargs)
    if coupled:
        options["example_inputs"] = x
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        pruner = pk.prune(model, options.pop("sparsity"), **options)
    # Every layer of these networks feeds the output: a warning saying otherwise would be spurious.
    assert not [w for w in caught if "affect none" in str(w.message)]
    return pruner


def _expected_uncoupled(pruner, sparsity, scope, min_kept):
    """(pruned units now, expected) per layer (local) or in all (global)."""
    counted, expected = [], []
    for target in pruner.targets:
        keep = pruner.masks.get(target.full_name)
        keep = torch.ones(target.param.shape, dtype=torch.bool) if keep is None else keep
        units = pruner.granularity.unit_scores(target.to_oik(keep.float()), "sum").reshape(-1) > 0
        counted.append(int((~units).sum()))
        expected.append(units.numel())
    if scope == "local":
        want = [0 if sparsity == 0 else min(round(sparsity * n), n - min(min_kept, n)) for n in expected]
        return counted, want
    total = sum(expected)
    return [sum(counted)], [min(round(sparsity * total), total - sum(min(min_kept, n) for n in expected))]


def _expected_coupled(pruner, sparsity, scope, min_kept):
    deps = pruner.dependencies
    pruned = removed_units(deps)
    sizes = torch.bincount(deps.unit_family, minlength=len(deps.families))
    caps = (sizes - min_kept).clamp(min=0)
    if scope == "local":
        counted = [int(pruned[deps.unit_family == f].sum()) for f in range(len(sizes))]
        want = [min(round(sparsity * int(n)), int(c)) for n, c in zip(sizes, caps)]
        return counted, want
    return [int(pruned.sum())], [min(round(sparsity * deps.num_units), int(caps.sum()))]


@settings(FUZZ, max_examples=150 * SCALE)
@given(data=st.data())
def test_random_arguments_on_random_networks(data):
    model, x = data.draw(networks())
    kwargs, coupled, error, what = data.draw(arguments(model))
    if what == "NaN weight":
        layer = data.draw(st.sampled_from([m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]))
        with torch.no_grad():
            layer.weight.view(-1)[0] = float("nan")
    before = snapshot(model)
    event(f"refused: {what}" if error is not None else f"accepted: {'coupled' if coupled else kwargs['granularity']}")
    if error is not None:
        with pytest.raises(error):
            _call(model, x, kwargs, coupled)
        assert_unchanged(model, before)
        return
    masked_before = model(x)
    original = copy.deepcopy(model)
    pruner = _call(model, x, kwargs, coupled)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["requires_grad"]
    if kwargs["sparsity"] == 0:
        torch.testing.assert_close(model(x), masked_before)
    sparsity, scope, min_kept = kwargs["sparsity"], kwargs["scope"], kwargs["min_kept"]
    if coupled:
        plain = kwargs["round_to"] == 1 and kwargs["sparsity_in"] == "channels" and kwargs["prune_only"] is None
        if plain:
            counted, want = _expected_coupled(pruner, sparsity, scope, min_kept)
            assert counted == want, (kwargs, pruner.dependencies.families)
        elif kwargs["round_to"] == 1 and kwargs["prune_only"] is None:  # round_to gives units back, by design
            _check_cost_reached(model, x, pruner, kwargs)
        _check_compaction(model, x, original, kwargs["prune_outputs"])
    else:
        counted, want = _expected_uncoupled(pruner, sparsity, scope, min_kept)
        assert counted == want, kwargs
    _check_training_keeps_pruned_weights_at_zero(model, x, pruner)


@pytest.mark.parametrize("case", INVALID_CASES, ids=lambda case: f"{case[0]}={case[1]!r}")
@settings(FUZZ, max_examples=6 * SCALE)
@given(data=st.data())
def test_every_invalid_argument_is_refused_on_random_networks(case, data):
    """Each invalid value of INVALID, on random networks and otherwise random valid arguments."""
    model, x = data.draw(networks())
    kwargs, coupled, _, _ = data.draw(arguments(model).filter(lambda drawn: drawn[2] is None))
    name, value, error = case
    if name == "NaN weight":
        layer = data.draw(st.sampled_from([m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]))
        with torch.no_grad():
            layer.weight.view(-1)[-1] = float("inf")
    elif name == "round_to outside coupled mode":
        kwargs["round_to"], coupled = 2, False
        kwargs.pop("coupled", None)
        kwargs["granularity"] = data.draw(st.sampled_from(GRANULARITIES))
    else:
        kwargs[name] = value
    before = snapshot(model)
    with pytest.raises(error):
        _call(model, x, kwargs, coupled)
    assert_unchanged(model, before)


def _check_training_keeps_pruned_weights_at_zero(model, x, pruner):
    """One SGD step (with momentum) and pruner.step(): every pruned entry is still exactly zero."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable:
        optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
        model(x).square().mean().backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    pruner.step()
    named = dict(model.named_parameters())
    for name, keep in pruner.masks.items():
        assert not bool(named[name].detach()[~keep].any()), name


def _check_cost_reached(model, x, pruner, kwargs):
    """With sparsity_in="params" / "macs", the removed units save at least the requested fraction of
    parameters / MACs, unless every family already lost all that min_kept lets it lose."""
    from prunekit.structure.cost import UnitCosts
    from prunekit.summary import weight_applications

    deps = pruner.dependencies
    applied = weight_applications(model, x) if kwargs["sparsity_in"] == "macs" else None
    pruned = removed_units(deps)
    saved = UnitCosts(model, deps, applied).removed_fraction(pruned, kwargs["sparsity_in"])
    if saved + 1e-9 < kwargs["sparsity"]:
        sizes = torch.bincount(deps.unit_family, minlength=len(deps.families))
        lost = torch.bincount(deps.unit_family[pruned], minlength=len(deps.families))
        assert torch.equal(lost, (sizes - kwargs["min_kept"]).clamp(min=0)), (kwargs, saved)


def _check_compaction(model, x, original, prune_outputs=False):
    """pk.compact equals the masked model, or says which module and op it could not handle; the
    compacted model saved with pk.save_pruned loads into ``original`` (an unpruned copy) and computes
    the same."""
    masked = model(x)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            small = pk.compact(model, x, prune_outputs=prune_outputs)
    except pk.CompactionError as error:
        event("CompactionError")
        names = [n for n, _ in model.named_modules() if n]
        assert any(f"'{n}'" in str(error) for n in names), f"CompactionError names no module: {error}"
        return
    if prune_outputs and small(x).shape != masked.shape:  # pruned classes are gone, not zero
        masked = masked[:, masked.abs().sum(dim=0) != 0]
    torch.testing.assert_close(small(x), masked, atol=1e-5, rtol=1e-4)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(flags[n] == p.requires_grad for n, p in small.named_parameters())
    buffer = io.BytesIO()
    pk.save_pruned(small, buffer)
    buffer.seek(0)
    loaded = pk.load_pruned(original, buffer)
    torch.testing.assert_close(loaded(x), small(x), atol=0, rtol=0)
    assert sum(p.numel() for p in small.parameters()) <= sum(p.numel() for p in model.parameters())


@FUZZ
@given(data=st.data())
def test_nm_prunes_exactly_n_of_every_m(data):
    model, x = data.draw(networks())
    targets = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention))]
    n, m = data.draw(st.sampled_from([(2, 4), (1, 4), (1, 2)]))
    before = snapshot(model)
    try:
        pruner = pk.prune(model, granularity=pk.NM(n, m))
    except ValueError as error:  # a layer whose input width is not a multiple of m
        assert f"{m}" in str(error)
        assert_unchanged(model, before)
        return
    assert targets
    for target in pruner.targets:
        keep = target.to_oik(pruner.masks[target.full_name]).transpose(1, 2).reshape(-1, m)  # groups run along I
        assert bool((keep.sum(dim=1) == n).all()), target.full_name


@FUZZ
@given(data=st.data(), tolerance=st.sampled_from([float("nan"), -1.0, float("inf"), "0.1"]))
def test_compact_refuses_bad_tolerances_without_touching_the_model(data, tolerance):
    model, x = data.draw(networks())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pk.prune(model, 0.5, granularity="out_channel", example_inputs=x)
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match="tolerance"):
        pk.compact(model, x, tolerance=tolerance)
    assert_unchanged(model, before)


@st.composite
def schedules(draw):
    start = draw(st.integers(0, 3))
    if draw(st.booleans()):
        rounds = draw(st.integers(1, 4))
        return pk.Iterative(start, start + draw(st.integers(rounds - 1, 8)), rounds)
    end = start + draw(st.integers(0, 8))
    return pk.Gradual(
        start, end, every=draw(st.integers(1, 4)), curve=draw(st.sampled_from(["cubic", "linear", "cosine"]))
    )


@FUZZ
@given(data=st.data(), schedule=schedules())
def test_scheduled_pruning_only_grows_masks_and_ends_at_the_requested_count(data, schedule):
    """Through an Iterative or Gradual schedule with SGD steps in between: masks only grow, pruned
    weights stay zero after every step, and after the last event the counts are exactly those of the
    final sparsity."""
    model, x = data.draw(networks())
    kwargs, coupled, _, _ = data.draw(arguments(model).filter(lambda drawn: drawn[2] is None and not drawn[1]))
    kwargs.pop("round_to", None)
    options = dict(kwargs)
    sparsity = options.pop("sparsity")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = pk.Pruner(model, sparsity, schedule=schedule, **options)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.05, momentum=0.9) if trainable else None
    previous = {}
    for _ in range(schedule.last_event + 2):
        if optimizer is not None:
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        pruner.step()
        named = dict(model.named_parameters())
        for name, keep in pruner.masks.items():
            assert not bool(named[name].detach()[~keep].any()), name
            if name in previous:
                assert not bool((keep & ~previous[name]).any()), f"{name} regrew"
        previous = {name: keep.clone() for name, keep in pruner.masks.items()}
    counted, want = _expected_uncoupled(pruner, sparsity, kwargs["scope"], kwargs["min_kept"])
    assert counted == want, (kwargs, schedule)
