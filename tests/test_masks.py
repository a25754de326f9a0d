"""Unit tests for prunekit.masks: bit packing, mask buffers and in-place zeroing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit.core.masks import (
    MASK_PREFIX,
    SeparableMask,
    count_kept,
    get_mask,
    kept_along,
    mask_buffer_name,
    pack_mask,
    remove_mask,
    set_mask,
    unpack_mask,
)

# ---------------------------------------------------------------------------- packing


def test_pack_mask_is_msb_first():
    keep = torch.tensor([True, False, False, False, False, False, False, True, False, True])
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8
    # 10 entries → 2 bytes; the second byte holds [0, 1] then six padding zeros: 0b01000000.
    assert packed.tolist() == [0b10000001, 0b01000000]


def test_pack_mask_all_true_byte_is_255():
    assert pack_mask(torch.ones(16, dtype=torch.bool)).tolist() == [255, 255]
    assert pack_mask(torch.zeros(9, dtype=torch.bool)).tolist() == [0, 0]


@st.composite
def bool_tensors(draw):
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=4)))
    numel = math.prod(shape)
    bits = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
    return torch.tensor(bits, dtype=torch.bool).reshape(shape)


@given(bool_tensors())
def test_pack_unpack_round_trip(keep):
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8
    assert packed.dim() == 1
    assert packed.numel() == (keep.numel() + 7) // 8
    unpacked = unpack_mask(packed, keep.shape)
    assert unpacked.dtype == torch.bool
    assert unpacked.shape == keep.shape
    assert torch.equal(unpacked, keep)
    # A plain tuple works as the shape too.
    assert torch.equal(unpack_mask(packed, tuple(keep.shape)), keep)


@given(st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip_flat_lengths(n, seed):
    # Every length, including those that are not a multiple of 8.
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, generator=generator) < 0.5
    assert torch.equal(unpack_mask(pack_mask(keep), (n,)), keep)


def test_pack_non_contiguous_input():
    keep = (torch.arange(12).reshape(3, 4) % 3 == 0).t()  # a transposed, non-contiguous view
    assert not keep.is_contiguous()
    assert torch.equal(unpack_mask(pack_mask(keep), keep.shape), keep)


@pytest.mark.parametrize("offset", range(10))
@pytest.mark.parametrize("length", [1, 8, 13, 16, 24])
def test_pack_views_at_any_storage_offset(offset, length):
    base = torch.arange(64) % 3 != 1
    keep = base[offset : offset + length]  # a view into a larger tensor, maybe misaligned
    packed = pack_mask(keep)
    assert packed.numel() == (length + 7) // 8
    assert torch.equal(unpack_mask(packed, (length,)), keep)
    assert torch.equal(base, torch.arange(64) % 3 != 1)  # the source is untouched


def test_pack_non_bool_input_counts_non_zero_as_kept():
    assert pack_mask(torch.tensor([0.0, 2.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0])).tolist() == [0b01010001]


# ---------------------------------------------------------------------------- set_mask / buffers


def _linear_with_known_weights() -> nn.Linear:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
    return layer


def test_set_mask_zeroes_weights_in_place():
    layer = _linear_with_known_weights()
    weight = layer.weight
    ptr = weight.data_ptr()
    keep = torch.tensor([[True, False, True], [False, True, False]])
    set_mask(layer, "weight", keep)
    assert layer.weight is weight
    assert layer.weight.data_ptr() == ptr
    assert torch.equal(layer.weight.detach(), torch.tensor([[1.0, 0.0, 3.0], [0.0, 5.0, 0.0]]))
    assert torch.equal(get_mask(layer, "weight"), keep)
    # The bias is untouched.
    assert torch.equal(layer.bias.detach(), torch.tensor([0.5, -0.5]))


def test_set_mask_stores_packed_buffer():
    layer = _linear_with_known_weights()
    keep = torch.tensor([[True, False, True], [False, True, False]])
    set_mask(layer, "weight", keep)
    buffer = layer._buffers[mask_buffer_name("weight")]
    assert mask_buffer_name("weight") == MASK_PREFIX + "weight"
    assert buffer.dtype == torch.uint8
    assert buffer.tolist() == [0b10101000]


def test_set_mask_wrong_shape_raises_and_leaves_weights():
    layer = _linear_with_known_weights()
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="shape"):
        set_mask(layer, "weight", torch.ones(3, 2, dtype=torch.bool))
    assert torch.equal(layer.weight.detach(), before)
    assert get_mask(layer, "weight") is None


def test_mask_buffers_are_not_persistent():
    model = nn.Sequential(_linear_with_known_weights(), nn.ReLU(), nn.Linear(2, 2))
    set_mask(model[0], "weight", torch.tensor([[True, False, True], [False, True, True]]))
    state = model.state_dict()
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert not any(MASK_PREFIX in key for key in state)
    # The buffer is still a real buffer of the module.
    assert any(name.endswith(mask_buffer_name("weight")) for name, _ in model.named_buffers())
    # A fresh instance loads the pruned weights strictly.
    fresh = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_mask_travels_with_deepcopy():
    layer = _linear_with_known_weights()
    keep = torch.tensor([[False, True, True], [True, True, False]])
    set_mask(layer, "weight", keep)
    clone = copy.deepcopy(layer)
    assert torch.equal(get_mask(clone, "weight"), keep)


def test_remove_mask_keeps_zeros():
    layer = _linear_with_known_weights()
    set_mask(layer, "weight", torch.tensor([[True, False, True], [False, True, False]]))
    remove_mask(layer, "weight")
    assert get_mask(layer, "weight") is None
    assert pk.masked_parameters(layer) == {}
    assert torch.equal(layer.weight.detach(), torch.tensor([[1.0, 0.0, 3.0], [0.0, 5.0, 0.0]]))
    remove_mask(layer, "weight")  # removing twice is harmless


def test_get_mask_without_mask_is_none():
    assert get_mask(nn.Linear(2, 2), "weight") is None


# ---------------------------------------------------------------------------- masked_parameters


def test_masked_parameters_names_and_values():
    model = nn.Sequential(nn.Linear(3, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 4)))
    keep0 = torch.tensor([[True, False, True], [False, True, True]])
    keep_bias = torch.tensor([True, False, True, True])
    keep_w = torch.tensor([[True, False], [False, True], [True, True], [False, False]])
    set_mask(model[0], "weight", keep0)
    set_mask(model[1][1], "weight", keep_w)
    set_mask(model[1][1], "bias", keep_bias)
    found = pk.masked_parameters(model)
    assert set(found) == {"0.weight", "1.1.weight", "1.1.bias"}
    assert torch.equal(found["0.weight"], keep0)
    assert torch.equal(found["1.1.weight"], keep_w)
    assert torch.equal(found["1.1.bias"], keep_bias)
    assert all(mask.dtype == torch.bool for mask in found.values())


def test_masked_parameters_of_root_module():
    layer = nn.Linear(3, 2)
    keep = torch.tensor([[True, False, True], [False, True, True]])
    set_mask(layer, "weight", keep)
    found = pk.masked_parameters(layer)
    assert list(found) == ["weight"]
    assert torch.equal(found["weight"], keep)


def test_masked_parameters_empty_for_unpruned_model(tiny_model):
    assert pk.masked_parameters(tiny_model) == {}


def test_masked_parameters_after_prune_matches_pruner_masks(tiny_model):
    pruner = pk.prune(tiny_model, sparsity=0.5)
    found = pk.masked_parameters(tiny_model)
    assert set(found) == {"0.weight", "3.weight"}
    for name, mask in pruner.masks.items():
        assert torch.equal(found[name], mask)
        # Each layer is pruned to exactly half (local scope, "weight" granularity).
        assert int((~mask).sum()) == round(0.5 * mask.numel())


# ---------------------------------------------------------------------------- magnitude masks

# Values around a threshold t = 0.25, signed zeros and infinities, all float32-exact.
magnitude_value = st.one_of(
    st.sampled_from([0.25, -0.25, 0.0, -0.0, 0.2499999850988388, 0.25000002980232239, math.inf, -math.inf]),
    st.floats(-1.0, 1.0, width=32),
)


@given(st.lists(magnitude_value, min_size=1, max_size=70), st.sampled_from([0.0, 0.25, 1.0]), st.booleans())
def test_magnitude_masks_match_comparing(values, threshold, with_buffers):
    from prunekit.core.masks import pack_magnitude_above, prune_magnitude

    x = torch.tensor(values, dtype=torch.float32)
    n = x.numel()
    spare = torch.tensor([n - 1]) if n > 2 else None
    expected = x.abs() > threshold
    if spare is not None:
        expected[spare] = True
    buffers = (torch.empty(n + 3), torch.empty(n + 3, dtype=torch.bool), torch.empty(n, dtype=torch.int64))
    packed = pack_magnitude_above(x, threshold, spare, *(buffers if with_buffers else ()))
    assert torch.equal(packed, pack_mask(expected))
    weight = x.clone()
    packed, keep = prune_magnitude(weight, threshold, spare, *(buffers[1:] if with_buffers else ()))
    assert torch.equal(packed, pack_mask(expected))
    assert torch.equal(keep, expected)
    assert torch.equal(weight, torch.where(expected, x, torch.zeros(())))  # zeroed in place, the rest untouched


def test_magnitude_masks_refuse_a_negative_threshold():
    from prunekit.core.masks import pack_magnitude_above

    with pytest.raises(ValueError, match="threshold"):
        pack_magnitude_above(torch.ones(3), -1.0)


@st.composite
def _separable(draw):
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=4)))
    dims = draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    factors = {dim: torch.rand(shape[dim], generator=generator) > 0.4 for dim in dims}
    return shape, factors


def _dense_and(shape, factors):
    keep = torch.ones(shape, dtype=torch.bool)
    for dim, vector in factors.items():
        view = [1] * len(shape)
        view[dim] = -1
        keep &= vector.view(view)
    return keep


@given(_separable(), st.booleans())
def test_separable_mask_packs_and_zeroes_as_the_whole_mask(case, contiguous):
    shape, factors = case
    expected = _dense_and(shape, factors)
    mask = SeparableMask(shape, factors)
    assert torch.equal(mask.dense(), expected)
    assert torch.equal(mask.packed(), pack_mask(expected))
    values = torch.randn(shape) + 3.0  # no zeros of its own
    if not contiguous and len(shape) > 1:
        values = values.transpose(0, -1).contiguous().transpose(0, -1)
    mask.zero(values)
    assert torch.equal(values != 0, expected)


def test_separable_mask_refuses_vectors_of_the_wrong_size():
    with pytest.raises(ValueError, match="one bool keep vector per dimension"):
        SeparableMask((4, 3), {1: torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="one bool keep vector per dimension"):
        SeparableMask((4, 3), {2: torch.ones(3, dtype=torch.bool)})


@given(_separable())
def test_kept_along_reads_any_kept_entry_per_index(case):
    shape, factors = case
    expected = _dense_and(shape, factors)
    for dim in range(len(shape)):
        naive = expected.movedim(dim, 0).reshape(shape[dim], -1).any(dim=1)
        assert torch.equal(kept_along(pack_mask(expected), shape, dim), naive)


@given(st.integers(0, 300), st.integers(0, 2**16))
def test_count_kept_counts_every_length(n, seed):
    keep = torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.5
    assert count_kept(pack_mask(keep)) == int(keep.sum())
