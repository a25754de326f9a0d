"""Dependency groups, coupled structured pruning and compaction on small hand-built models."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit.structure import UnsupportedOperationError, trace_dependencies


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a wrongly kept or dropped channel shows in the outputs."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
    return model


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _prune_and_compact(model, x, sparsity=0.5, **options):
    model.eval()
    pruner = pk.prune(model, sparsity, criterion="l2", granularity="out_channel", example_inputs=x, **options)
    with torch.no_grad():
        masked = model(x)
    small = pk.compact(model, x, prune_outputs=options.get("prune_outputs", False))
    with torch.no_grad():
        compacted = small(x)
    return pruner, small, masked, compacted


def _assert_close(masked, compacted, tolerance=1e-5):
    scale = masked.abs().max()
    assert masked.shape == compacted.shape
    assert (masked - compacted).abs().max() <= tolerance * scale


class ResidualNet(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width * 2, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * 2)
        self.conv2 = nn.Conv2d(width * 2, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 4, 1)
        self.right = nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(10, 7, 1)
        self.fc = nn.Linear(7 * 2 * 2, 3)

    def forward(self, x):
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)
        x = F.relu(self.mix(x))
        return self.fc(F.adaptive_max_pool2d(x, 2).flatten(1))


class TinyAttention(nn.Module):
    """Self-attention written the way Hugging Face and timm write it: heads from view(..., -1, head_dim)."""

    def __init__(self, dim=16, heads=4, kv_heads=4, head_dim=4):
        super().__init__()
        self.head_dim, self.groups = head_dim, heads // kv_heads
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 32)
        self.down = nn.Linear(32, dim)

    def _split(self, x):
        b, n, _ = x.shape
        return x.view(b, n, -1, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        if self.groups > 1:
            k = k.repeat_interleave(self.groups, dim=1)
            v = v.repeat_interleave(self.groups, dim=1)
        attended = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(attended.transpose(1, 2).reshape(b, n, -1))
        return x + self.down(F.gelu(self.up(self.norm(x))))


# ---------------------------------------------------------------------------- dependency groups


def test_residual_add_couples_every_layer_writing_and_reading_the_stream():
    deps = trace_dependencies(ResidualNet(), torch.randn(1, 3, 8, 8))
    assert deps.num_units == 8 + 16  # the residual stream's channels, conv1's filters
    stream = [u for u in range(deps.num_units) if "stem.weight" in deps.members(u)]
    assert len(stream) == 8
    # Channel 3 of the stream: the stem filter and its norm, conv2's filter and bn2 (they write into the
    # add), conv1's input column and the head's input column (they read it).
    members = deps.members(stream[3])
    assert members == {
        "stem.weight": {0: [3]},
        "stem_bn.weight": {0: [3]},
        "stem_bn.bias": {0: [3]},
        "stem_bn.running_mean": {0: [3]},
        "stem_bn.running_var": {0: [3]},
        "conv1.weight": {1: [3]},
        "conv2.weight": {0: [3]},
        "bn2.weight": {0: [3]},
        "bn2.bias": {0: [3]},
        "bn2.running_mean": {0: [3]},
        "bn2.running_var": {0: [3]},
        "head.weight": {1: [3]},
    }


def test_model_outputs_keep_their_size_unless_opted_in():
    assert trace_dependencies(ResidualNet(), torch.randn(1, 3, 8, 8)).num_units == 24
    opted = trace_dependencies(ResidualNet(), torch.randn(1, 3, 8, 8), prune_outputs=True)
    assert opted.num_units == 24 + 5


def test_concat_maps_each_branch_to_its_positions_and_flatten_to_its_columns():
    deps = trace_dependencies(ConcatNet(), torch.randn(1, 3, 4, 4))
    right_2 = next(u for u in range(deps.num_units) if deps.members(u).get("right.weight") == {0: [2]})
    assert deps.members(right_2)["mix.weight"] == {1: [4 + 2]}
    mix_1 = next(u for u in range(deps.num_units) if deps.members(u).get("mix.weight", {}).get(0) == [1])
    # flatten of (7, 2, 2): channel 1 is read by columns 4..7 of fc.
    assert deps.members(mix_1)["fc.weight"] == {1: [4, 5, 6, 7]}


def test_depthwise_conv_couples_input_and_output_channel():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    deps = trace_dependencies(model, torch.randn(1, 3, 5, 5))
    assert deps.num_units == 6
    assert deps.members(4) == {
        "0.weight": {0: [4]},
        "0.bias": {0: [4]},
        "2.weight": {0: [4]},
        "2.bias": {0: [4]},
        "4.weight": {1: [4]},
    }


def test_grouped_conv_prunes_whole_groups():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4), nn.ReLU(), nn.Conv2d(8, 2, 1))
    deps = trace_dependencies(model, torch.randn(1, 3, 5, 5))
    assert deps.num_units == 4
    assert deps.members(1)["0.weight"] == {0: [2, 3]} and deps.members(1)["2.weight"] == {0: [2, 3]}


def test_group_norm_couples_the_channels_of_a_group():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    deps = trace_dependencies(model, torch.randn(1, 3, 4, 4))
    assert deps.num_units == 2
    assert deps.members(0)["1.weight"] == {0: [0, 1, 2, 3]}


def test_layer_norm_over_channels_pins_them():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    deps = trace_dependencies(model, torch.randn(2, 4))
    assert deps.num_units == 8  # only the second Linear's outputs: the first feeds the LayerNorm
    assert all("0.weight" not in deps.members(u) for u in range(deps.num_units))


def test_channel_that_is_not_zero_when_pruned_is_pinned():
    sigmoid = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    relu = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    shifted = nn.Sequential(nn.Linear(4, 8), nn.Hardsigmoid(), nn.Linear(8, 2))
    assert trace_dependencies(sigmoid, torch.randn(2, 4)).num_units == 0
    assert trace_dependencies(shifted, torch.randn(2, 4)).num_units == 0
    assert trace_dependencies(relu, torch.randn(2, 4)).num_units == 8


def test_gating_by_a_sigmoid_keeps_channels_removable():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.a(x) * torch.sigmoid(self.b(x)))

    deps = trace_dependencies(Gate(), torch.randn(2, 4))
    assert deps.num_units == 8
    assert set(deps.members(0)) == {"a.weight", "a.bias", "b.weight", "b.bias", "out.weight"}


def test_constant_slice_pins_the_channels_it_shifts():
    class Slicer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = nn.Linear(4, 8), nn.Linear(3, 2)

        def forward(self, x):
            return self.out(F.relu(self.a(x))[:, :3])

    assert trace_dependencies(Slicer(), torch.randn(2, 4)).num_units == 0


def test_attention_heads_are_units_with_grouped_query_attention():
    model = TinyAttention(heads=4, kv_heads=2)
    deps = trace_dependencies(model, torch.randn(1, 5, 16))
    heads = [u for u in range(deps.num_units) if "k.weight" in deps.members(u)]
    assert len(heads) == 2  # one unit per key/value head, with the two query heads that share it
    members = deps.members(heads[1])
    assert members["k.weight"] == {0: [4, 5, 6, 7]}
    assert members["q.weight"] == {0: list(range(8, 16))}
    assert members["o.weight"] == {1: list(range(8, 16))}
    assert deps.num_units == 2 + 32  # the MLP's hidden neurons are units too; the hidden size is pinned


def test_trace_leaves_the_model_unchanged():
    model = _randomize_norms(ResidualNet()).train()
    before = copy.deepcopy(model.state_dict())
    trace_dependencies(model, torch.randn(2, 3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_unsupported_operation_names_the_operation_and_module():
    class Spectral(nn.Module):
        def forward(self, x):
            return torch.fft.rfft(x).real

    model = nn.Sequential(nn.Linear(4, 8), Spectral(), nn.Linear(5, 2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedOperationError, match=r"'fft_rfft'.*'1'.*exclude"):
        pk.prune(model, 0.5, granularity="out_channel", example_inputs=torch.randn(2, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._buffers for m in model.modules())
    # Excluding the module leaves it whole and everything feeding it in place.
    deps = trace_dependencies(model, torch.randn(2, 4), exclude=["1"])
    assert deps.num_units == 0


def test_structured_pruning_needs_example_inputs_only_for_coupling():
    model = ResidualNet()
    pruner = pk.prune(model, 0.5, granularity="out_channel")
    assert pruner.dependencies is None  # per-layer masks as before


# ---------------------------------------------------------------------------- pruning and compaction


@pytest.mark.parametrize("scope", ["local", "global"])
def test_compacted_residual_net_computes_what_the_masked_one_did(scope):
    model = _randomize_norms(ResidualNet())
    x = torch.randn(2, 3, 8, 8)
    pruner, small, masked, compacted = _prune_and_compact(model, x, scope=scope, prune_outputs=False)
    _assert_close(masked, compacted)
    assert small.head.out_features == 5
    if scope == "local":
        assert small.conv1.out_channels == 8 and small.bn1.num_features == 8 and small.conv2.in_channels == 8
        assert small.stem.out_channels == 4 and small.head.in_features == 4
    assert _params(small) < _params(model)
    assert not pk.masked_parameters(small)


def test_pruned_outputs_opt_in_shrinks_the_stream():
    model = _randomize_norms(ResidualNet())
    x = torch.randn(2, 3, 8, 8)
    _, small, masked, compacted = _prune_and_compact(model, x, scope="local", prune_outputs=True)
    assert small.stem.out_channels == 4 and small.head.in_features == 4 and small.head.out_features == 3
    kept_classes = masked.ne(0).any(dim=0)  # pruned classes are exact zeros in the masked model
    assert int(kept_classes.sum()) == 3
    _assert_close(masked[:, kept_classes], compacted)


def test_compacted_concat_and_attention_models_match():
    for model, x in [
        (ConcatNet(), torch.randn(2, 3, 4, 4)),
        (TinyAttention(heads=4, kv_heads=2), torch.randn(2, 5, 16)),
    ]:
        _, small, masked, compacted = _prune_and_compact(model, x)
        _assert_close(masked, compacted)
        assert _params(small) < _params(model)


def test_compacted_attention_loses_whole_heads():
    model = TinyAttention(heads=4, kv_heads=4)
    x = torch.randn(1, 5, 16)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x, layer_sparsity={"up": 0.0})
    small = pk.compact(model, x)
    assert small.q.out_features == 8 and small.k.out_features == 8 and small.o.in_features == 8


def test_round_to_keeps_channel_counts_multiples():
    model = nn.Sequential(nn.Linear(4, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 2))
    x = torch.randn(3, 4)
    pk.prune(model, 0.45, granularity="out_channel", example_inputs=x, round_to=8)
    small = pk.compact(model, x)
    assert small[0].out_features % 8 == 0 and small[2].out_features % 8 == 0
    assert small[0].out_features < 40


def test_local_scope_prunes_every_family_alike_and_min_kept_holds():
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))
    x = torch.randn(3, 4)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x, scope="local")
    small = pk.compact(model, x)
    assert (small[0].out_features, small[2].out_features) == (5, 10)
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))
    pk.prune(model, 0.99, granularity="out_channel", example_inputs=x, scope="global", min_kept=2)
    small = pk.compact(model, x)
    assert small[0].out_features >= 2 and small[2].out_features >= 2


def test_max_layer_sparsity_caps_each_family_under_global_ranking():
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))
    x = torch.randn(3, 4)
    # 15 of the 30 units must go and no family may lose more than half: exactly half of each.
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x, scope="global", max_layer_sparsity=0.5)
    small = pk.compact(model, x)
    assert small[0].out_features == 5 and small[2].out_features == 10
    with pytest.raises(ValueError, match="max_layer_sparsity"):
        pk.Pruner(model, 0.5, granularity="out_channel", example_inputs=x, max_layer_sparsity=1.5)


def test_layer_sparsity_names_the_producing_layer():
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))
    x = torch.randn(3, 4)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x, layer_sparsity={"0": 0.0})
    small = pk.compact(model, x)
    assert small[0].out_features == 10 and small[2].out_features == 10
    with pytest.raises(ValueError, match="match no layer"):
        pk.prune(model, 0.5, granularity="out_channel", example_inputs=x, layer_sparsity={"4": 0.3})


def test_compacted_model_trains():
    model = _randomize_norms(ResidualNet())
    x = torch.randn(4, 3, 8, 8)
    _, small, _, _ = _prune_and_compact(model, x)
    small.train()
    loss = small(x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in small.parameters())


def test_iterative_structured_schedule_and_repeated_compaction_compose():
    model = _randomize_norms(ResidualNet(width=8))
    x = torch.randn(2, 3, 8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = pk.Pruner(model, 0.5, granularity="out_channel", example_inputs=x, optimizer=optimizer,
                       schedule=pk.Iterative(start=0, end=4, rounds=2))  # fmt: skip
    for _ in range(5):
        model.train()
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    pruner.remove()
    small = pk.compact(model, x)
    assert small.conv1.out_channels == 8
    pk.prune(small, 0.5, granularity="out_channel", example_inputs=x)
    smaller = pk.compact(small, x)
    assert smaller.conv1.out_channels == 4
    fresh = ResidualNet(width=8)
    # The two plans compose into one: a fresh model rebuilt from it matches.
    pk.apply_plan(fresh, smaller.prunekit_plan)
    fresh.load_state_dict(smaller.state_dict())
    smaller.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), smaller(x))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_and_load_rebuild_the_compacted_model_without_pickling(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    model = _randomize_norms(ResidualNet())
    x = torch.randn(2, 3, 8, 8)
    _, small, _, compacted = _prune_and_compact(model, x)
    path = tmp_path / f"small{suffix}"
    pk.save_pruned(small, path)
    loaded = pk.load_pruned(ResidualNet(), path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), compacted)


def test_load_into_a_different_architecture_is_refused_before_any_change(tmp_path):
    model = _randomize_norms(ResidualNet())
    x = torch.randn(2, 3, 8, 8)
    _, small, _, _ = _prune_and_compact(model, x)
    path = tmp_path / "small.pt"
    pk.save_pruned(small, path)
    other = ResidualNet(width=4)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="same configuration"):
        pk.load_pruned(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_compact_without_masks_removes_all_zero_units():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight[2:4] = 0
        model[0].bias[2:4] = 0
    small = pk.compact(model, torch.randn(3, 4))
    assert small[0].out_features == 4 and small[2].in_features == 4


# ---------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    sparsity=st.floats(0.0, 0.95),
    scope=st.sampled_from(["local", "global"]),
    residual=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_compaction_equals_masked_model_on_random_mlps(widths, sparsity, scope, residual, seed):
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 6)
            self.hidden = nn.ModuleList(nn.Sequential(nn.Linear(6, w), nn.ReLU(), nn.Linear(w, 6)) for w in widths)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            x = F.relu(self.inp(x))
            for block in self.hidden:
                x = x + block(x) if residual else F.relu(block(x))
            return self.out(x)

    model = Net()
    x = torch.randn(4, 5)
    _, small, masked, compacted = _prune_and_compact(model, x, sparsity=sparsity, scope=scope)
    _assert_close(masked, compacted)
    assert _params(small) <= _params(model)


def test_multihead_attention_loses_whole_heads_and_the_rest_still_prunes():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 16)
            self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 3)

        def forward(self, x):
            x = self.embed(x)
            x = x + self.attention(x, x, x, need_weights=False)[0]
            return self.down(F.relu(self.up(x)))

    model = Encoder().eval()
    x = torch.randn(2, 5, 6)
    deps = trace_dependencies(model, x)
    assert deps.num_units == 16 + 4 + 32  # the residual stream, the 4 heads, the MLP's hidden neurons
    _, small, masked, compacted = _prune_and_compact(model, x)
    assert small.attention.embed_dim == 8 and small.attention.num_heads == 2 and small.up.out_features == 16
    _assert_close(masked, compacted)


def test_tracing_on_the_meta_device_needs_no_weight_memory():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to("meta")
    deps = trace_dependencies(model, torch.randn(2, 8, device="meta"))
    assert deps.num_units == 16


def test_a_trace_is_reused_only_while_nothing_it_depends_on_changes():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    first = trace_dependencies(model, x)
    assert trace_dependencies(model, x) is first
    assert trace_dependencies(model, torch.randn(3, 5, 4)) is not first  # other input shape
    assert trace_dependencies(model, x, reuse=False) is not first
    model[0] = nn.Linear(4, 6)
    model[2] = nn.Linear(6, 2)
    assert trace_dependencies(model, x).num_units == 6


def _count_forwards(model: nn.Module) -> list[int]:
    """Runs of this very module that computed values (compact's deep copy inherits the hook, but is another
    module; a shape-only trace runs it on meta tensors, which computes nothing)."""
    calls = [0]

    def count(module, args, output):
        calls[0] += module is model and output.device.type != "meta"

    model.register_forward_hook(count)
    return calls


class _ReadsValues(ResidualNet):
    """A forward that branches on a value: a shape-only trace cannot run it, the tracer runs it for real."""

    def forward(self, x):
        return super().forward(x) if bool(x.abs().sum() >= 0) else x


@pytest.mark.parametrize("net", [ResidualNet, _ReadsValues])
def test_compact_runs_the_model_for_real_once(net):
    """The check's reference: the run of a fresh trace when the tracer had to run the model for real,
    else (a cached trace, or a trace of shapes only) one run of the masked model."""
    torch.manual_seed(0)
    model, x = _randomize_norms(net()).eval(), torch.randn(2, 3, 8, 8)
    pk.prune(model, 0.5, criterion="l2", granularity="out_channel", example_inputs=x).remove()
    with torch.no_grad():
        masked = model(x)
    fresh = copy.deepcopy(model)  # no trace cached for the copy: compact traces it
    calls = _count_forwards(fresh)
    small = pk.compact(fresh, x)
    assert calls[0] == 1
    with torch.no_grad():
        _assert_close(masked, small(x))
    calls = _count_forwards(model)  # the trace cached by prune predates the zeroed weights: the model runs
    pk.compact(model, x)
    assert calls[0] == 1


@pytest.mark.parametrize("cached", [False, True])
def test_compact_check_catches_a_wrong_compaction(cached, monkeypatch):
    compact_module = importlib.import_module("prunekit.compact")  # (pk.compact is the function)

    torch.manual_seed(0)
    model, x = _randomize_norms(ResidualNet()).eval(), torch.randn(2, 3, 8, 8)
    pk.prune(model, 0.5, criterion="l2", granularity="out_channel", example_inputs=x).remove()
    if not cached:
        model = copy.deepcopy(model)
    sliced_copy = compact_module.sliced_copy

    def wrong(model, plan, *more):  # slices as planned, then changes one kept weight
        small = sliced_copy(model, plan, *more)
        with torch.no_grad():
            small.head.weight[0, 0] += 1.0
        return small

    monkeypatch.setattr(compact_module, "sliced_copy", wrong)
    with pytest.raises(pk.CompactionError):
        pk.compact(model, x)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from(["sum", "l2"]))
def test_nonzero_units_read_off_the_scores_change_no_removed_unit(seed, reduce):
    # Zero filters (removed already), filters of values whose squares underflow (not removed) and
    # masked layers: the screen from the scores must agree with reading every weight.
    from prunekit.structure.units import removed_units, unit_scores

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in (model[0], model[3]):
            rows = torch.randperm(conv.out_channels, generator=generator)[:3]
            conv.weight[rows[0]] = 0.0
            conv.weight[rows[1]] = 1e-30
            if conv.bias is not None:
                conv.bias[rows[0]] = 0.0
    x = torch.randn(1, 3, 8, 8)
    if seed % 2:
        pk.prune(model, 0.25, granularity="out_channel", example_inputs=x).remove()  # weights zeroed, masks gone
    deps = trace_dependencies(model, x, reuse=False)
    weights = {
        f"{i}.weight": (lambda i=i: model[i].weight.abs() if reduce == "sum" else model[i].weight) for i in (0, 3, 5)
    }
    nonzero = torch.zeros(deps.num_units, dtype=torch.bool)
    unit_scores(deps, weights, reduce, nonzero)
    expected = removed_units(deps)
    assert expected.any()  # the zero filter of model[3] (no norm after it) is removed already
    assert torch.equal(removed_units(deps, nonzero_units=nonzero), expected)
