"""Attention heads as units of structured pruning: torch.nn.MultiheadAttention (compacted into a
PrunedMultiheadAttention), torchvision's VisionTransformer and Hugging Face GPT-2's fused q, k, v."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.attention import PrunedMultiheadAttention, shrink_multihead_attention
from prunekit.structure import trace_dependencies


class SelfAttentionNet(nn.Module):
    """Tokens through an nn.MultiheadAttention with a residual, a padding mask and a causal mask."""

    def __init__(self, batch_first: bool, width: int = 16, heads: int = 4):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.head = nn.Linear(width, 3)

    def forward(self, x, padding):
        h = self.embed(x)
        length = h.shape[1] if self.batch_first else h.shape[0]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        attended, _ = self.attention(h, h, h, key_padding_mask=padding, attn_mask=causal)
        return self.head(F.relu(h + attended))


def _inputs(batch_first: bool) -> dict:
    x = torch.randn(2, 5, 6) if batch_first else torch.randn(5, 2, 6)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, -2:] = True
    return {"x": x, "padding": padding}


def _float64_outputs(model, inputs):
    widened = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(**widened)


def _assert_same(a, b, tolerance=1e-7):
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tolerance * float(a.abs().max())


def _head_rows(head: int, head_dim: int, width: int) -> list[int]:
    """Rows of head ``head`` in a packed [q; k; v] in_proj_weight."""
    return [part * width + head * head_dim + i for part in range(3) for i in range(head_dim)]


def test_heads_with_zero_projections_are_the_ones_removed():
    """4 heads of 4 channels: heads 1 and 3 compute nothing (zero q, k, v rows and biases), so pruning
    half of the heads takes exactly those, and the compacted module has 2 heads left."""
    torch.manual_seed(0)
    model = SelfAttentionNet(batch_first=True).eval()
    inputs = _inputs(True)
    with torch.no_grad():
        for head in (1, 3):
            rows = _head_rows(head, 4, 16)
            model.attention.in_proj_weight[rows] = 0
            model.attention.in_proj_bias[rows] = 0
    pk.prune(model, 0.5, criterion="magnitude", granularity="out_channel", example_inputs=inputs,
             layer_sparsity={"embed": 0.0})  # fmt: skip
    small = pk.compact(model, inputs)
    attention = small.attention
    assert isinstance(attention, PrunedMultiheadAttention)
    assert attention.num_heads == 2 and attention.head_dim == 4 and attention.embed_dim == 16
    assert attention.in_proj_weight.shape == (24, 16) and attention.out_proj.weight.shape == (16, 8)
    # Heads 0 and 2 stay: channels 0-3 and 8-11 of each of q, k and v.
    kept_rows = small.prunekit_plan["kept"]["attention.in_proj_weight"]["0"]
    assert kept_rows == [part + i for part in (0, 16, 32) for i in (0, 1, 2, 3, 8, 9, 10, 11)]
    assert small.prunekit_plan["kept"]["attention.out_proj.weight"]["1"] == [0, 1, 2, 3, 8, 9, 10, 11]


def test_small_projections_decide_which_heads_go():
    """A head's score sums its q, k, v rows of in_proj_weight and its columns of out_proj (both are
    pruning targets): the two heads whose weights are 100 times smaller are removed."""
    torch.manual_seed(0)
    model = SelfAttentionNet(batch_first=False).eval()
    inputs = _inputs(False)
    with torch.no_grad():
        for head in (0, 3):
            model.attention.in_proj_weight[_head_rows(head, 4, 16)] *= 0.01
            model.attention.out_proj.weight[:, 4 * head : 4 * head + 4] *= 0.01
    pk.prune(model, 0.5, criterion="magnitude", granularity="out_channel", example_inputs=inputs,
             layer_sparsity={"embed": 0.0})  # fmt: skip
    small = pk.compact(model, inputs)
    assert small.attention.num_heads == 2
    assert small.prunekit_plan["kept"]["attention.out_proj.weight"]["1"] == list(range(4, 12))


@pytest.mark.parametrize("batch_first", [True, False])
def test_compacted_multihead_attention_matches_trains_saves_and_pickles(batch_first, tmp_path):
    torch.manual_seed(0)
    model = SelfAttentionNet(batch_first).eval()
    inputs = _inputs(batch_first)
    deps = trace_dependencies(model, inputs)
    heads = [u for u in range(deps.num_units) if 1 in deps.members(u).get("attention.out_proj.weight", {})]
    assert len(heads) == 4
    # One unit per head: its q, k and v rows, its biases and its 4 columns of out_proj.
    members = deps.members(heads[2])
    assert members["attention.in_proj_weight"][0] == _head_rows(2, 4, 16)
    assert members["attention.out_proj.weight"][1] == [8, 9, 10, 11]
    pk.prune(model, 0.5, criterion="l2", granularity="out_channel", example_inputs=inputs)
    small = pk.compact(model, inputs)
    assert small.attention.num_heads == 2 and small.attention.in_proj_weight.shape[0] == 3 * 2 * 4
    _assert_same(_float64_outputs(model, inputs), _float64_outputs(small, inputs))

    small.train()
    small(**inputs).square().mean().backward()
    assert small.attention.in_proj_weight.grad is not None
    small.eval()

    clone = pickle.loads(pickle.dumps(small))
    duplicate = copy.deepcopy(small)
    with torch.no_grad():
        expected = small(**inputs)
        assert torch.equal(clone(**inputs), expected) and torch.equal(duplicate(**inputs), expected)
    path = tmp_path / "small.pt"
    pk.save_pruned(small, path)
    loaded = pk.load_pruned(SelfAttentionNet(batch_first), path).eval()
    assert isinstance(loaded.attention, PrunedMultiheadAttention)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), expected)


def _as_pruned(module: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """The same module, turned into a PrunedMultiheadAttention without removing anything (a 1-row
    change of embed_dim forces the switch and is undone)."""
    pruned = copy.deepcopy(module)
    pruned.embed_dim += 1
    shrink_multihead_attention(pruned)
    assert isinstance(pruned, PrunedMultiheadAttention)
    return pruned


@pytest.mark.parametrize(
    "options, call",
    [
        ({"batch_first": True}, {"need_weights": True}),
        ({"batch_first": True}, {"need_weights": True, "average_attn_weights": False}),
        ({"batch_first": False}, {"need_weights": False}),
        ({"batch_first": True, "kdim": 6, "vdim": 10}, {"need_weights": True}),
        ({"batch_first": True, "add_bias_kv": True, "add_zero_attn": True}, {"need_weights": True}),
        ({"batch_first": False, "bias": False}, {"need_weights": False}),
    ],
)
def test_pruned_multihead_attention_computes_what_torch_does(options, call):
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(8, 2, **options).eval()
    pruned = _as_pruned(stock)
    batch_first = options["batch_first"]
    shape = (3, 5) if batch_first else (5, 3)
    query = torch.randn(*shape, 8)
    key = torch.randn(*shape, options.get("kdim", 8))
    value = torch.randn(*shape, options.get("vdim", 8))
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -1] = True
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        additive = torch.zeros(5, 5).masked_fill(causal, float("-inf"))
        for masks in ({}, {"key_padding_mask": padding, "attn_mask": causal}, {"attn_mask": additive}):
            expected = stock(query, key, value, **masks, **call)
            found = pruned(query, key, value, **masks, **call)
            for a, b in zip(expected, found):
                assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)
        # Unbatched inputs, as nn.MultiheadAttention takes them.
        expected, found = stock(query[0], key[0], value[0], **call), pruned(query[0], key[0], value[0], **call)
        assert torch.allclose(expected[0], found[0], atol=1e-6)


def test_pruned_multihead_attention_drops_out_in_training_like_torch():
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True).train()
    pruned = _as_pruned(stock).train()
    x = torch.randn(2, 5, 8)
    torch.manual_seed(1)
    expected = stock(x, x, x)
    torch.manual_seed(1)
    found = pruned(x, x, x)
    assert torch.allclose(expected[0], found[0], atol=1e-6) and torch.allclose(expected[1], found[1], atol=1e-6)
    assert not torch.allclose(found[0], pruned.eval()(x, x, x)[0])


def test_returned_attention_weights_keep_the_heads():
    """Head-averaged attention weights change when any head goes: returned (or read), they pin the heads."""

    class ReturnsWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.up = nn.Linear(8, 16)

        def forward(self, x):
            out, weights = self.attention(x, x, x)
            return self.up(out), weights

    for prune_outputs in (False, True):  # outputs may lose channels, but these mix all heads
        deps = trace_dependencies(ReturnsWeights().eval(), torch.randn(1, 4, 8), prune_outputs=prune_outputs)
        assert all(1 not in deps.members(u).get("attention.out_proj.weight", {}) for u in range(deps.num_units))
        assert not bool(deps.unit_is_head.any())


def test_a_mask_per_head_keeps_the_heads():
    """A 3-D attn_mask holds one mask per (batch, head): the caller fixes the head count."""

    class PerHeadMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x, mask):
            h = self.embed(x)
            return self.head(self.attention(h, h, h, attn_mask=mask, need_weights=False)[0])

    inputs = {"x": torch.randn(3, 5, 4), "mask": torch.zeros(3 * 2, 5, 5)}
    deps = trace_dependencies(PerHeadMask().eval(), inputs)
    assert deps.num_units == 8 + 8  # the embedding width and the attention output width, no head
    assert all(1 not in deps.members(u).get("attention.out_proj.weight", {}) for u in range(deps.num_units))


def test_transformer_encoder_layer_in_eval_mode_skips_torch_fused_path():
    """nn.TransformerEncoderLayer takes a fused kernel in eval mode that assumes embed_dim = heads ×
    head_dim; the compacted layer must not take it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True), nn.Linear(16, 3)
    ).eval()
    x = torch.randn(2, 5, 16)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x)
    small = pk.compact(model, x)
    assert small[0].self_attn.num_heads == 2
    with torch.no_grad():
        _assert_same(model(x), small(x), tolerance=1e-5)


def test_torchvision_vision_transformer_loses_whole_heads(tmp_path):
    torchvision = pytest.importorskip("torchvision")

    def build():
        return torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64
        )

    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 32, 32)
    pk.prune(model, 0.5, criterion="l2", granularity="out_channel", example_inputs=x)
    small = pk.compact(model, x)
    for layer in small.encoder.layers:
        attention = layer.self_attention
        assert attention.num_heads == 2 and attention.in_proj_weight.shape == (3 * 2 * 8, 32)
        assert attention.out_proj.weight.shape == (32, 16)
    with torch.no_grad():
        masked, compacted = copy.deepcopy(model).double()(x.double()), copy.deepcopy(small).double()(x.double())
    _assert_same(masked, compacted)
    small.train()
    small(x).square().mean().backward()
    small.eval()
    path = tmp_path / "vit.safetensors"
    pk.save_pruned(small, path)
    loaded = pk.load_pruned(build(), path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    pickle.loads(pickle.dumps(small))


def test_gpt2_heads_are_removed_whole_from_the_fused_projection():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 7))}
    deps = trace_dependencies(model, inputs)
    heads = [u for u in range(deps.num_units) if 0 in deps.members(u).get("transformer.h.0.attn.c_proj.weight", {})]
    assert len(heads) == 4
    # Head 1: its q, k and v columns of c_attn (split by split_size = 32) and its rows of c_proj.
    members = deps.members(heads[1])
    assert members["transformer.h.0.attn.c_attn.weight"][1] == [p * 32 + 8 + i for p in range(3) for i in range(8)]
    assert members["transformer.h.0.attn.c_proj.weight"][0] == list(range(8, 16))
    pk.prune(model, 0.5, criterion="l2", granularity="out_channel", example_inputs=inputs)
    small = pk.compact(model, inputs)
    for block in small.transformer.h:
        attention = block.attn
        assert attention.num_heads == 2 and attention.split_size == 16
        assert attention.c_attn.weight.shape == (32, 3 * 2 * 8) and attention.c_proj.weight.shape == (16, 32)
    with torch.no_grad():
        ids = inputs["input_ids"]
        masked, compacted = copy.deepcopy(model).double()(ids).logits, copy.deepcopy(small).double()(ids).logits
    _assert_same(masked, compacted)


def test_cross_attention_with_other_key_and_value_widths_loses_heads():
    """kdim/vdim differ from embed_dim: separate q, k, v projections, each cut by the same heads."""

    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(16, 4, kdim=6, vdim=10, batch_first=True)
            self.keys, self.values = nn.Linear(3, 6), nn.Linear(3, 10)
            self.head = nn.Linear(16, 2)

        def forward(self, query, memory):
            out, _ = self.attention(query, self.keys(memory), self.values(memory), need_weights=False)
            return self.head(out)

    torch.manual_seed(0)
    model = CrossAttention().eval()
    inputs = {"query": torch.randn(2, 4, 16), "memory": torch.randn(2, 7, 3)}
    pk.prune(model, 0.5, criterion="l2", granularity="out_channel", example_inputs=inputs)
    small = pk.compact(model, inputs)
    attention = small.attention
    assert attention.num_heads == 2 and attention.q_proj_weight.shape == (8, 16)
    assert attention.k_proj_weight.shape == (8, 3) and attention.v_proj_weight.shape == (8, 5)
    assert attention.kdim == 3 and attention.vdim == 5
    _assert_same(_float64_outputs(model, inputs), _float64_outputs(small, inputs))


def test_a_compacted_multihead_attention_can_be_pruned_and_compacted_again(tmp_path):
    torch.manual_seed(0)
    model = SelfAttentionNet(batch_first=True).eval()
    inputs = _inputs(True)
    pk.prune(model, 0.5, criterion="l2", granularity="out_channel", example_inputs=inputs)
    small = pk.compact(model, inputs)
    pk.prune(small, 0.5, criterion="l2", granularity="out_channel", example_inputs=inputs)
    smaller = pk.compact(small, inputs)
    assert smaller.attention.num_heads == 1 and smaller.attention.in_proj_weight.shape[0] == 3 * 4
    _assert_same(_float64_outputs(small, inputs), _float64_outputs(smaller, inputs))
    path = tmp_path / "smaller.pt"
    pk.save_pruned(smaller, path)
    loaded = pk.load_pruned(SelfAttentionNet(batch_first=True), path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), smaller(**inputs))


def test_multihead_attention_projections_are_pruning_targets():
    """in_proj_weight (or q/k/v_proj_weight) is pruned like a Linear's weight, its bias with whole rows."""
    torch.manual_seed(0)
    packed = nn.MultiheadAttention(16, 4)
    pruner = pk.prune(packed, 0.5, granularity="weight")
    assert set(pruner.masks) == {"in_proj_weight", "out_proj.weight"}
    assert float((packed.in_proj_weight == 0).float().mean()) == 0.5
    rows = pk.prune(nn.MultiheadAttention(16, 4), 0.25, granularity="out_channel", coupled=False)
    assert set(rows.masks) == {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
    assert int((~rows.masks["in_proj_bias"]).sum()) == 12  # a quarter of the 48 q, k, v rows
    separate = nn.MultiheadAttention(16, 4, kdim=8, vdim=12)
    assert set(pk.prune(separate, 0.5).masks) == {"q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"}


class _PlainHeadAttention(nn.Module):
    """Two heads whose query and key are a projection (head 0) and the model's input itself (head 1)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 8)
        self.out, self.last = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        b, t, _ = x.shape
        plain = x[..., :4]
        q, k = torch.stack([self.q(x), plain], dim=1), torch.stack([self.k(x), plain], dim=1)
        v = self.v(x).view(b, t, 2, 4).transpose(1, 2)
        y = ((q @ k.transpose(-1, -2)).softmax(-1) @ v).transpose(1, 2).reshape(b, t, 8)
        return self.last(torch.relu(self.out(y)))


def test_a_head_of_plain_data_marks_no_other_unit_as_a_head():
    """Head 1's scores carry no channel (its query and key are the input), so its id is −1: it must not be
    read as the last id, whose unit (an output of the last layer, with prune_outputs) is no head."""
    deps = pk.trace_dependencies(_PlainHeadAttention().eval(), torch.randn(2, 5, 8), reuse=False, prune_outputs=True)
    heads = [deps.members(u) for u in range(deps.num_units) if deps.unit_is_head[u]]
    assert len(heads) == 2 and not any("last.weight" in members for members in heads)
