"""Granularities, checked against masks computed by hand on small weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.methods.granularity import get_granularity

T, F = True, False

# |W| holds every integer 1..16 once, with mixed signs and rows/columns permuted so that no answer
# is a plain "first half"/"second half".
#   row L1 sums: 28, 40, 30, 38       column L1 sums: 28, 34, 29, 45
W4 = torch.tensor(
    [
        [3.0, 1.0, -10.0, 14.0],
        [12.0, 9.0, -4.0, -15.0],
        [-7.0, -16.0, 2.0, 5.0],
        [-6.0, -8.0, 13.0, 11.0],
    ]
)


def linear4(bias: bool = False) -> nn.Linear:
    layer = nn.Linear(4, 4, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(W4)
        if bias:
            layer.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    return layer


def prune_linear4(granularity, sparsity=0.5, criterion="magnitude", bias=False):
    layer = linear4(bias)
    pruner = pk.prune(layer, sparsity=sparsity, granularity=granularity, scope="local", criterion=criterion)
    return layer, pruner


# ---------------------------------------------------------------------------- 4×4 Linear


def test_weight_granularity_hand_computed():
    # Keep |w| >= 9 (the 8 largest of 1..16).
    expected = torch.tensor(
        [
            [F, F, T, T],
            [T, T, F, T],
            [F, T, F, F],
            [F, F, T, T],
        ]
    )
    layer, pruner = prune_linear4("weight")
    assert list(pruner.masks) == ["weight"]
    assert torch.equal(pruner.masks["weight"], expected)
    assert torch.equal(layer.weight.detach(), W4 * expected)


def test_kernel_granularity_on_linear_is_per_weight():
    # A Linear has one kernel position, so a kernel is a single weight.
    expected = torch.tensor(
        [
            [F, F, T, T],
            [T, T, F, T],
            [F, T, F, F],
            [F, F, T, T],
        ]
    )
    _, pruner = prune_linear4("kernel")
    assert torch.equal(pruner.masks["weight"], expected)


def test_out_channel_granularity_hand_computed():
    # Row sums 28, 40, 30, 38: rows 0 and 2 go.
    expected = torch.tensor(
        [
            [F, F, F, F],
            [T, T, T, T],
            [F, F, F, F],
            [T, T, T, T],
        ]
    )
    layer, pruner = prune_linear4("out_channel")
    assert torch.equal(pruner.masks["weight"], expected)
    assert torch.equal(layer.weight.detach(), W4 * expected)


def test_in_channel_granularity_hand_computed():
    # Column sums 28, 34, 29, 45: columns 0 and 2 go.
    expected = torch.tensor(
        [
            [F, T, F, T],
            [F, T, F, T],
            [F, T, F, T],
            [F, T, F, T],
        ]
    )
    layer, pruner = prune_linear4("in_channel")
    assert torch.equal(pruner.masks["weight"], expected)
    assert torch.equal(layer.weight.detach(), W4 * expected)


def test_block_granularity_hand_computed():
    # 2×2 tiles: top-left 3+1+12+9 = 25, top-right 10+14+4+15 = 43,
    #            bottom-left 7+16+6+8 = 37, bottom-right 2+5+13+11 = 31 → 25 and 31 go.
    expected = torch.tensor(
        [
            [F, F, T, T],
            [F, F, T, T],
            [T, T, F, F],
            [T, T, F, F],
        ]
    )
    _, pruner = prune_linear4(pk.Block(2, 2))
    assert torch.equal(pruner.masks["weight"], expected)


def test_nm_granularity_hand_computed():
    # 2:4 along in_features: every row is one group of 4; keep its 2 largest |w|.
    expected = torch.tensor(
        [
            [F, F, T, T],  # 3 1 10 14
            [T, F, F, T],  # 12 9 4 15
            [T, T, F, F],  # 7 16 2 5
            [F, F, T, T],  # 6 8 13 11
        ]
    )
    _, pruner = prune_linear4(pk.NM(2, 4))
    assert torch.equal(pruner.masks["weight"], expected)


def test_nm_sparsity_may_be_left_out():
    layer = linear4()
    pruner = pk.prune(layer, granularity=pk.NM(2, 4))
    assert int(pruner.masks["weight"].sum()) == 8
    assert pruner.masks["weight"].sum(dim=1).tolist() == [2, 2, 2, 2]


def test_out_channel_also_zeroes_bias_entries():
    layer, pruner = prune_linear4("out_channel", bias=True)
    assert set(pruner.masks) == {"weight", "bias"}
    assert torch.equal(pruner.masks["bias"], torch.tensor([F, T, F, T]))
    assert torch.equal(layer.bias.detach(), torch.tensor([0.0, 2.0, 0.0, 4.0]))
    # The pruned outputs are exactly zero whatever the input.
    out = layer(torch.randn(5, 4))
    assert torch.equal(out[:, 0], torch.zeros(5))
    assert torch.equal(out[:, 2], torch.zeros(5))


@pytest.mark.parametrize("granularity", ["weight", "kernel", "in_channel", pk.Block(2, 2), pk.NM(2, 4)])
def test_other_granularities_leave_bias_alone(granularity):
    layer, pruner = prune_linear4(granularity, bias=True)
    assert set(pruner.masks) == {"weight"}
    assert torch.equal(layer.bias.detach(), torch.tensor([1.0, 2.0, 3.0, 4.0]))


# ---------------------------------------------------------------------------- l2 vs magnitude


def test_l2_and_magnitude_disagree_on_crafted_rows():
    # Row 0 = [3, 3]: L1 = 6, L2 = 4.24; row 1 = [5, 0.5]: L1 = 5.5, L2 = 5.02.
    weight = torch.tensor([[3.0, 3.0], [5.0, 0.5]])

    def run(criterion):
        layer = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            layer.weight.copy_(weight)
        return pk.prune(layer, sparsity=0.5, granularity="out_channel", criterion=criterion).masks["weight"]

    assert torch.equal(run("magnitude"), torch.tensor([[T, T], [F, F]]))  # L1 prunes row 1
    assert torch.equal(run("l2"), torch.tensor([[F, F], [T, T]]))  # L2 prunes row 0


def test_l2_block_scores():
    # Same disagreement through Block(1, 2) tiles of one row each.
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 3.0], [5.0, 0.5]]))
    mask = pk.prune(layer, sparsity=0.5, granularity=pk.Block(1, 2), criterion="l2").masks["weight"]
    assert torch.equal(mask, torch.tensor([[F, F], [T, T]]))


# ---------------------------------------------------------------------------- Block edge tiles


def test_block_with_edge_tiles_5x5():
    # Tiles of Block(2, 2) on 5×5: a 3×3 grid; the last tile row/column is 1 wide.
    # Every weight of a tile has the same |value| c; the tile score is c × (tile size):
    #   tile (r, c):   (0,0) 1×4=4   (0,1) 3×4=12   (0,2) 4×2=8
    #                  (1,0) 2.5×4=10 (1,1) 0.5×4=2  (1,2) 3×2=6
    #                  (2,0) 1.5×2=3 (2,1) 4.5×2=9  (2,2) 7×1=7
    # sparsity 0.45 of 9 tiles → round(4.05) = 4 pruned: scores 2, 3, 4, 6.
    tile_values = [[1.0, -3.0, 4.0], [-2.5, 0.5, -3.0], [1.5, -4.5, 7.0]]
    weight = torch.empty(5, 5)
    bounds = [(0, 2), (2, 4), (4, 5)]
    for r, (r0, r1) in enumerate(bounds):
        for c, (c0, c1) in enumerate(bounds):
            weight[r0:r1, c0:c1] = tile_values[r][c]
    layer = nn.Linear(5, 5, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    pruner = pk.prune(layer, sparsity=0.45, granularity=pk.Block(2, 2))
    expected = torch.tensor(
        [
            [F, F, T, T, T],
            [F, F, T, T, T],
            [T, T, F, F, F],
            [T, T, F, F, F],
            [F, F, T, T, T],
        ]
    )
    assert torch.equal(pruner.masks["weight"], expected)


def test_block_unit_scores_and_expand_shapes():
    block = pk.Block(2, 3)
    scores = torch.arange(1.0, 36.0).reshape(5, 7, 1)  # (O, I, K) = (5, 7, 1)
    units = block.unit_scores(scores, "sum")
    assert units.shape == (3 * 3,)
    # First tile: rows 0-1, columns 0-2 → 1+2+3+8+9+10.
    assert units[0].item() == 33.0
    # Bottom-right edge tile: row 4, column 6 only → 35.
    assert units[-1].item() == 35.0
    keep = torch.zeros(9, dtype=torch.bool)
    keep[-1] = True
    full = block.expand(keep, (5, 7, 1))
    assert full.shape == (5, 7, 1)
    assert full.sum().item() == 1 and full[4, 6, 0].item()


def test_block_on_conv_uses_in_times_kernel_columns():
    # Conv weight (2, 1, 2, 2) is seen as the 2×4 matrix W.reshape(O, I·K); Block(1, 2) pairs
    # kernel positions (0, 1) and (2, 3) of each filter.
    conv = nn.Conv2d(1, 2, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 1.0], [5.0, 5.0]]], [[[4.0, 4.0], [0.5, 0.5]]]]))
    # Tile scores: 2, 10, 8, 1 → 1 and 2 go.
    mask = pk.prune(conv, sparsity=0.5, granularity=pk.Block(1, 2)).masks["weight"]
    expected = torch.tensor([[[[F, F], [T, T]]], [[[T, T], [F, F]]]])
    assert torch.equal(mask, expected)


# ---------------------------------------------------------------------------- kernel on a conv


def test_kernel_granularity_on_conv_hand_computed():
    # Conv2d(2 → 2, 2×2): four kernels W[o, i] with L1 norms 4, 6, 5, 1 → (1,1) and (0,0) go.
    # (Per weight, magnitude would prune differently: W[0,0] holds a 2.)
    conv = nn.Conv2d(2, 2, 2, bias=False)
    weight = torch.tensor(
        [
            [[[1.0, -2.0], [0.5, 0.5]], [[3.0, 0.0], [0.0, -3.0]]],
            [[[-2.0, 1.0], [1.0, 1.0]], [[0.25, 0.25], [0.25, 0.25]]],
        ]
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
    pruner = pk.prune(conv, sparsity=0.5, granularity="kernel")
    mask = pruner.masks["weight"]
    assert mask.shape == (2, 2, 2, 2)
    kernel_kept = torch.tensor([[F, T], [T, F]])
    assert torch.equal(mask, kernel_kept[:, :, None, None].expand(2, 2, 2, 2))
    assert torch.equal(conv.weight.detach(), weight * mask)


def test_out_channel_on_conv_zeroes_filter_and_bias():
    conv = nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0, 3.0]).reshape(3, 1, 1, 1))
        conv.bias.copy_(torch.tensor([10.0, 20.0, 30.0]))
    pruner = pk.prune(conv, sparsity=0.34, granularity="out_channel")  # round(1.02) = 1 filter
    assert torch.equal(pruner.masks["weight"].reshape(3), torch.tensor([T, F, T]))
    assert torch.equal(pruner.masks["bias"], torch.tensor([T, F, T]))
    assert torch.equal(conv.bias.detach(), torch.tensor([10.0, 0.0, 30.0]))


# ---------------------------------------------------------------------------- N:M


def test_nm_on_conv_groups_along_input_channels():
    # Conv2d(4 → 1, 1×2): at kernel position 0 the input channels hold 1 4 2 3 (keep channels 1, 3);
    # at position 1 they hold 8 5 7 6 (keep channels 0, 2). Grouping the flattened weight
    # [1 8 4 5 | 2 7 3 6] instead would give a different answer.
    conv = nn.Conv2d(4, 1, (1, 2), bias=False)
    weight = torch.tensor([[1.0, 8.0], [4.0, -5.0], [-2.0, 7.0], [3.0, 6.0]]).reshape(1, 4, 1, 2)
    with torch.no_grad():
        conv.weight.copy_(weight)
    mask = pk.prune(conv, granularity=pk.NM(2, 4)).masks["weight"]
    expected = torch.tensor([[F, T], [T, F], [F, T], [T, F]]).reshape(1, 4, 1, 2)
    assert torch.equal(mask, expected)


def test_nm_on_conv_with_two_groups_of_channels():
    # 8 input channels → two groups of 4 at every (output, kernel position).
    conv = nn.Conv2d(8, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([5.0, 1.0, 2.0, 6.0, 0.1, 0.4, 0.3, 0.2]).reshape(1, 8, 1, 1))
    mask = pk.prune(conv, granularity=pk.NM(2, 4)).masks["weight"].reshape(8)
    assert torch.equal(mask, torch.tensor([T, F, F, T, F, T, T, F]))


def test_nm_ties_prune_earlier_position():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    mask = pk.prune(layer, granularity=pk.NM(2, 4)).masks["weight"]
    assert torch.equal(mask, torch.tensor([[F, F, T, T]]))


def test_nm_m_not_dividing_in_features_raises():
    layer = nn.Linear(6, 2)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="multiple of m=4"):
        pk.prune(layer, granularity=pk.NM(2, 4))
    assert torch.equal(layer.weight.detach(), before)
    assert pk.masked_parameters(layer) == {}


def test_nm_on_conv_checks_input_channels():
    with pytest.raises(ValueError, match="multiple of m=4"):
        pk.prune(nn.Conv2d(6, 8, 3), granularity=pk.NM(2, 4))


def test_nm_constructor_validation():
    with pytest.raises(ValueError):
        pk.NM(4, 4)
    with pytest.raises(ValueError):
        pk.NM(0, 4)
    with pytest.raises(TypeError):
        pk.NM(2.0, 4)
    assert pk.NM(2, 4).sparsity == 0.5
    assert pk.NM(1, 4) == pk.NM(1, 4) and pk.NM(1, 4) != pk.NM(2, 4)


def test_block_constructor_validation():
    for bad in [(0, 2), (2, 0), (1.5, 2), (True, 2)]:
        with pytest.raises(ValueError):
            pk.Block(*bad)
    assert pk.Block(2, 2) == pk.Block(2, 2) and pk.Block(2, 2) != pk.Block(2, 1)
    assert hash(pk.Block(2, 3)) == hash(pk.Block(2, 3))


# ---------------------------------------------------------------------------- ConvTranspose


def test_conv_transpose_out_channel_masks_weight_dim_1():
    # ConvTranspose2d weights are (in, out, kh, kw): output channel c is weight[:, c].
    # Output channel L1 norms: 1+1 = 2, 5+4 = 9, 2+3 = 5; sparsity 0.6 of 3 → round(1.8) = 2 go.
    conv = nn.ConvTranspose2d(2, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 5.0, -2.0], [-1.0, 4.0, 3.0]]).reshape(2, 3, 1, 1))
        conv.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    pruner = pk.prune(conv, sparsity=0.6, granularity="out_channel")
    mask = pruner.masks["weight"]
    assert mask.shape == (2, 3, 1, 1)
    assert torch.equal(mask.reshape(2, 3), torch.tensor([[F, T, F], [F, T, F]]))
    assert torch.equal(pruner.masks["bias"], torch.tensor([F, T, F]))
    assert torch.equal(conv.bias.detach(), torch.tensor([0.0, 2.0, 0.0]))
    out = conv(torch.randn(1, 2, 3, 3))
    assert torch.equal(out[:, 0], torch.zeros(1, 3, 3))
    assert torch.equal(out[:, 2], torch.zeros(1, 3, 3))


def test_conv_transpose_in_channel_masks_weight_dim_0():
    # Input channel L1 norms: 1+5+2 = 8 and 1+4+3 = 8.5 → channel 0 goes.
    conv = nn.ConvTranspose2d(2, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 5.0, -2.0], [-1.0, 4.0, 3.5]]).reshape(2, 3, 1, 1))
    mask = pk.prune(conv, sparsity=0.5, granularity="in_channel").masks["weight"]
    assert torch.equal(mask.reshape(2, 3), torch.tensor([[F, F, F], [T, T, T]]))


# ---------------------------------------------------------------------------- lookup


def test_get_granularity_names_and_errors():
    for name in ["weight", "kernel", "out_channel", "in_channel"]:
        assert get_granularity(name).name == name
    block = pk.Block(2, 2)
    assert get_granularity(block) is block
    with pytest.raises(ValueError, match="unknown granularity"):
        get_granularity("channel")
    with pytest.raises(TypeError):
        get_granularity(3)
