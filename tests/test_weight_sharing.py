"""Weight sharing (k-means per layer, Deep Compression) and the entropy coders of compressed files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import prunekit as pk
from prunekit.compressed import SharedClusters, kmeans_1d
from prunekit.compressed.entropy import (
    canonical_codes,
    decode_stream,
    encode_stream,
    huffman_decode,
    huffman_encode,
    huffman_lengths,
)

pytest.importorskip("zstandard")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.fc1 = nn.Linear(6 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def pruned_net(seed=0, sparsity=0.7):
    torch.manual_seed(seed)
    model = Net()
    pk.prune(model, sparsity=sparsity)
    return model


def uniform_sse(values: np.ndarray, levels: int) -> float:
    """Squared error of plain uniform quantization: ``levels`` evenly spaced values from min to max, nearest."""
    grid = np.linspace(values.min(), values.max(), levels)
    nearest = grid[np.abs(values[:, None] - grid[None, :]).argmin(axis=1)]
    return float(((values - nearest) ** 2).sum())


finite = st.floats(-10, 10, allow_nan=False, width=32).filter(lambda v: v != 0)


@settings(max_examples=30)
@given(arrays(np.float64, st.integers(1, 300), elements=finite), st.integers(1, 6))
def test_kmeans_is_no_worse_than_uniform_quantization(values, bits):
    centroids, assignment = kmeans_1d(values, 1 << bits, "linear")
    assert centroids.size <= 1 << bits and np.all(np.diff(centroids) > 0)
    sse = float(((values - centroids[assignment]) ** 2).sum())
    assert sse <= uniform_sse(values, 1 << bits) * (1 + 1e-9) + 1e-12


@settings(max_examples=30)
@given(
    arrays(np.float64, st.integers(1, 200), elements=finite),
    st.integers(1, 5),
    st.sampled_from(["linear", "density", "random"]),
)
def test_kmeans_assigns_every_value_its_nearest_centroid(values, bits, init):
    centroids, assignment = kmeans_1d(values, 1 << bits, init, seed=3)
    distances = np.abs(values[:, None] - centroids[None, :])
    assert np.allclose(distances[np.arange(values.size), assignment], distances.min(axis=1))
    if np.unique(values).size <= 1 << bits:  # few distinct values are kept exactly
        assert np.array_equal(centroids[assignment], values)


def test_kmeans_by_hand():
    values = np.array([-1.0, -0.9, 0.5, 0.7, 3.0])
    centroids, assignment = kmeans_1d(values, 2, "linear")
    # Linear init at −1 and 3; Lloyd moves them to the means of {−1, −0.9, 0.5, 0.7} and {3}.
    assert np.allclose(centroids, [-0.175, 3.0]) and assignment.tolist() == [0, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="unknown k-means initialisation 'kmeans\\+\\+'"):
        kmeans_1d(values, 2, "kmeans++")


@pytest.mark.parametrize("bits", [1, 3, 5])
@pytest.mark.parametrize("codebook_dtype", ["float32", "float16"])
def test_shared_layers_have_at_most_2_to_the_bits_values_and_zeros_stay_zero(bits, codebook_dtype):
    model = pruned_net()
    shared = pk.share_weights(model, bits, codebook_dtype=codebook_dtype)
    for name in ("conv", "fc1", "fc2"):
        before, after = getattr(model, name).weight, getattr(shared, name).weight
        assert torch.unique(after[after != 0]).numel() <= 1 << bits
        assert bool((after[before == 0] == 0).all())
        if codebook_dtype == "float16":
            assert torch.equal(after, after.half().float())
        # Biases are not shared unless asked.
        assert torch.equal(getattr(model, name).bias, getattr(shared, name).bias)
    assert not torch.equal(model.fc1.weight, shared.fc1.weight)  # a copy by default; the original is untouched


def test_saving_with_weight_bits_stores_exactly_what_share_weights_computes(tmp_path):
    model = pruned_net()
    bits = {"conv": 6, "linear": 4, "fc2": 3, "bias": 5}
    shared = pk.share_weights(model, bits)
    report = pk.save_pruned(model, tmp_path / "a.pk", sparse=True, weight_bits=bits)
    loaded = pk.load_pruned(Net(), tmp_path / "a.pk")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in shared.state_dict().items())
    values = {t.name: t.values for t in report.tensors}
    assert values["conv.weight"] == "shared 6-bit (float32 codebook)"
    assert values["fc1.weight"] == "shared 4-bit (float32 codebook)"
    assert values["fc2.weight"] == "shared 3-bit (float32 codebook)"
    assert values["fc2.bias"] == "shared 5-bit (float32 codebook)"
    # Re-sharing a shared model changes nothing, so its file is the same, byte for byte.
    pk.save_pruned(shared, tmp_path / "b.pk", sparse=True, weight_bits=bits)
    assert (tmp_path / "a.pk").read_bytes() == (tmp_path / "b.pk").read_bytes()


def test_sharing_in_place_changes_the_model_itself():
    model = pruned_net()
    assert pk.share_weights(model, 2, inplace=True) is model
    assert torch.unique(model.fc1.weight[model.fc1.weight != 0]).numel() <= 4


def test_bad_weight_sharing_options_are_refused_before_anything_changes(tmp_path):
    model = pruned_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="weight_bits must be an integer number of bits from 1 to 8, got 9"):
        pk.share_weights(model, 9)
    with pytest.raises(ValueError, match=r"weight_bits\['linear'\] must be an integer"):
        pk.save_pruned(model, tmp_path / "m.pk", sparse=True, weight_bits={"linear": 2.5})
    with pytest.raises(
        ValueError, match=r"weight_bits names \['head'\], which match no conv, linear or embedding layer"
    ):
        pk.save_pruned(model, tmp_path / "m.pk", sparse=True, weight_bits={"head": 4})
    with pytest.raises(ValueError, match="unknown k-means initialisation"):
        pk.save_pruned(model, tmp_path / "m.pk", sparse=True, weight_bits=4, init="kmeans++")
    with pytest.raises(ValueError, match="codebook_dtype must be one of"):
        pk.share_weights(model, 4, codebook_dtype="bfloat16")
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="fc1.weight holds NaN"):
        pk.save_pruned(model, tmp_path / "m.pk", sparse=True, weight_bits=4)
    assert not any(tmp_path.iterdir())
    model.fc1.weight.data[0, 0] = before["fc1.weight"][0, 0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------- entropy coding


def test_huffman_code_by_hand():
    lengths = huffman_lengths(np.array([5, 1, 1, 1]))
    # Ties merge the lower symbols first: {1, 2}, then {3, {1, 2}}, then {0, ...}.
    assert lengths.tolist() == [1, 3, 3, 2]
    # Canonical, by (length, symbol): 0 → 0, 3 → 10, 1 → 110, 2 → 111.
    assert canonical_codes(lengths).tolist() == [0b0, 0b110, 0b111, 0b10]
    # The stream 0 1 0 3 (counts 2, 1, 0, 1): lengths 1, 2, 0, 2; codes 0 → 0, 1 → 10, 3 → 11.
    blob = huffman_encode(np.array([0, 1, 0, 3], dtype=np.uint8), 4)
    # u16 alphabet, 4 lengths, then the bits 0 10 0 11 padded: 0100 1100 = 0x4C.
    assert blob == bytes([4, 0, 1, 2, 0, 2, 0x4C])
    assert huffman_decode(blob, 4, np.uint8).tolist() == [0, 1, 0, 3]


@given(st.integers(1, 9), st.data())
def test_every_coder_round_trips(bits, data):
    dtype = np.uint8 if bits <= 8 else np.uint16
    symbols = np.array(data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=400)), dtype=dtype)
    for codec in ("zstd", "zlib"):
        coder, blob = encode_stream(symbols, bits, codec)
        assert decode_stream(coder, blob, symbols.size, bits, dtype).tolist() == symbols.tolist()
    if symbols.size:
        assert huffman_decode(huffman_encode(symbols, 1 << bits), symbols.size, dtype).tolist() == symbols.tolist()


def test_huffman_wins_on_skewed_shared_weight_indices():
    rng = np.random.default_rng(0)
    symbols = rng.geometric(0.3, size=5000).clip(max=31).astype(np.uint8)
    coder, blob = encode_stream(symbols, 5, "zlib")
    assert coder == "huffman" and len(blob) < 5000 * 5 / 8


def test_attention_input_projections_count_as_linear_weights():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    shared = pk.share_weights(model, 2)
    weight = shared[0].in_proj_weight
    assert torch.unique(weight[weight != 0]).numel() <= 4
    assert torch.unique(shared[0].out_proj.weight).numel() <= 4
    assert torch.equal(shared[0].in_proj_bias, model[0].in_proj_bias)


def test_retraining_a_shared_model_keeps_its_clusters_tied_and_its_zeros_zero():
    model = pruned_net()
    shared = pk.share_weights(model, 2)
    clusters = SharedClusters(shared, 2)
    before = shared.fc1.weight.detach().clone()
    optimizer = torch.optim.SGD(shared.parameters(), lr=0.1)
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 4, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(shared(x), y).backward()
        optimizer.step()
        clusters.project()
    after = shared.fc1.weight.detach()
    assert not torch.equal(after, before)  # the centroids moved
    assert bool((after[before == 0] == 0).all())
    # Weights that shared a value still share one, and each layer holds at most 4.
    for value in torch.unique(before[before != 0]):
        assert torch.unique(after[before == value]).numel() == 1
    assert torch.unique(after[after != 0]).numel() <= 4


def test_shared_clusters_refuse_a_model_that_is_not_shared():
    with pytest.raises(ValueError, match="more than 2\\^2: share the model with pk.share_weights"):
        SharedClusters(pruned_net(), 2)
