"""Compressed files (pk.save_pruned(..., sparse=True)): exact round trips over random patterns, index
forms, compacted models with their plans, and every refusal leaving the model unchanged."""

from __future__ import annotations

import copy
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit.compressed import CompressedFileError, inspect_file
from prunekit.compressed.encode import decode_positions, layouts, relative_positions, relative_symbols
from prunekit.compressed.format import FORMAT_VERSION

pytest.importorskip("zstandard")


class Holder(nn.Module):
    """One parameter of any shape and dtype, plus an integer buffer."""

    def __init__(self, shape, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype))
        self.register_buffer("steps", torch.zeros(3, dtype=torch.long))


class Net(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def bits_of(tensor: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so NaN and -0.0 compare exactly."""
    flat = tensor.detach().reshape(-1).contiguous()
    return flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])


def without_negative_zeros(tensor: torch.Tensor) -> torch.Tensor:
    return torch.where(tensor == 0, torch.zeros((), dtype=tensor.dtype), tensor)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed load must leave as it was: tensors (bit for bit), requires_grad, hooks, attributes."""
    return {
        "state": {k: bits_of(v).clone() for k, v in model.state_dict(keep_vars=True).items()},
        "params": {k: (id(p), p.requires_grad) for k, p in model.named_parameters()},
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "attributes": [
            {k: v for k, v in vars(m).items() if isinstance(v, (int, float, tuple, str))} for m in model.modules()
        ],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["params"] == before["params"]
    assert after["hooks"] == before["hooks"]
    assert after["attributes"] == before["attributes"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])


def pattern(draw, shape, kind):
    numel = int(np.prod(shape))
    if kind == "empty":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "dense":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "unstructured":
        density = draw(st.floats(0.0, 1.0))
        seed = draw(st.integers(0, 2**16))
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density
    if kind == "rows":
        rows = torch.tensor(draw(st.lists(st.booleans(), min_size=shape[0], max_size=shape[0])))
        return rows.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
    if kind == "nm":
        m = 4
        keep = torch.zeros(numel // m, m, dtype=torch.bool)
        order = torch.rand(numel // m, m, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))).argsort(1)
        keep.scatter_(1, order[:, :2], True)
        o, i = shape[0], shape[1]
        kernel = numel // (o * i)
        return keep.reshape(o, i // m, kernel, m).transpose(2, 3).reshape(shape)
    # block: 2 × 2 blocks of the first two dims
    blocks = torch.rand((shape[0] + 1) // 2, (shape[1] + 1) // 2) < 0.4
    full = blocks.repeat_interleave(2, 0).repeat_interleave(2, 1)[: shape[0], : shape[1]]
    return full.reshape(*full.shape, *([1] * (len(shape) - 2))).expand(shape).clone()


@st.composite
def tensors(draw):
    kind = draw(st.sampled_from(["unstructured", "empty", "dense", "rows", "nm", "block"]))
    ndim = draw(st.integers(2 if kind in ("rows", "nm", "block") else 1, 4))
    shape = [draw(st.integers(1, 9)) for _ in range(ndim)]
    if kind == "nm":
        shape[1] = 4 * draw(st.integers(1, 4))
    if draw(st.booleans()) and kind == "unstructured":
        shape[0] = 0  # a tensor with no elements
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    keep = pattern(draw, tuple(shape), kind)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 999)))).to(dtype)
    values = torch.where(keep, values, torch.zeros((), dtype=dtype)).contiguous()
    if values.numel() and draw(st.booleans()):  # special values are stored as they are
        flat = values.view(-1)
        flat[0] = draw(st.sampled_from([float("nan"), float("inf"), -0.0, 1e-30]))
    return values


@settings(max_examples=60)
@given(tensors())
def test_lossless_files_reload_every_pattern_bit_for_bit(tensor):
    model = Holder(tensor.shape, tensor.dtype)
    with torch.no_grad():
        model.weight.copy_(tensor)
        model.steps.copy_(torch.tensor([3, 0, -7]))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.pk"
        report = pk.save_pruned(model, path, sparse=True)
        loaded = pk.load_pruned(Holder(tensor.shape, tensor.dtype), path)
        assert report.file_bytes == path.stat().st_size
    # Exact: every value the same bits, NaN and infinities included; a negative zero may come back as +0.0.
    assert torch.equal(bits_of(without_negative_zeros(loaded.weight)), bits_of(without_negative_zeros(tensor)))
    assert torch.equal(loaded.weight, tensor) or bool(tensor.isnan().any())
    assert torch.equal(loaded.steps, model.steps)


def test_a_pruned_conv_and_linear_model_reloads_exactly_and_computes_the_same(tmp_path):
    torch.manual_seed(0)
    model = Net()
    model.bn.running_mean.uniform_(-1, 1)
    pk.prune(model, sparsity=0.8, criterion="magnitude", scope="global")
    report = pk.save_pruned(model, tmp_path / "m.pk", sparse=True)
    loaded = pk.load_pruned(Net(), tmp_path / "m.pk")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 3, 8, 8)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # Masks are not part of the state dict, so the loaded model has none: its zeros are plain zeros.
    assert pk.masked_parameters(loaded) == {}
    assert inspect_file(tmp_path / "m.pk") == report
    nonzero = sum(int((v != 0).sum()) for v in model.state_dict().values() if v.is_floating_point())
    assert report.file_bytes < 4 * nonzero * 1.25 + 1024


def test_relative_indices_split_long_gaps_with_fillers():
    # Positions 0, 3 and 20 with 3-bit symbols (filler 7 = advance 7, nothing stored):
    # gaps of 0, 2 and 16 zeros; 16 = 7 + 7 + 2.
    where = np.array([0, 3, 20])
    symbols = relative_symbols(where, 3)
    assert symbols.tolist() == [0, 2, 7, 7, 2]
    assert relative_positions(symbols, 3).tolist() == [0, 3, 20]
    # A gap that is an exact multiple of the filler step: 14 zeros = 7 + 7 + 0.
    assert relative_symbols(np.array([14]), 3).tolist() == [7, 7, 0]


@given(st.lists(st.integers(0, 5000), unique=True, max_size=200), st.sampled_from([3, 4, 5, 6, 8]))
def test_relative_indices_round_trip(positions, bits):
    where = np.array(sorted(positions), dtype=np.int64)
    symbols = relative_symbols(where, bits)
    assert symbols.max(initial=0) < 1 << bits
    assert relative_positions(symbols, bits).tolist() == where.tolist()


def test_nm_patterns_take_at_most_two_bits_per_kept_weight(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    pk.prune(model, sparsity=0.5, granularity=pk.NM(2, 4))
    report = pk.save_pruned(model, tmp_path / "m.pk", sparse=True)
    weight = next(t for t in report.tensors if t.name == "0.weight")
    # 2:4 positions take 2 bits per kept weight in the nm form; a Huffman-coded bitmask reaches
    # log2(6)/2 ≈ 1.3 bits, and the cheaper one is kept.
    assert weight.form in ("nm(2:4)", "bitmask")
    assert weight.position_bytes <= 32 * 64 // 2 * 2 // 8
    loaded = pk.load_pruned(nn.Sequential(nn.Linear(64, 32)), tmp_path / "m.pk")
    assert torch.equal(loaded[0].weight, model[0].weight)


@given(
    st.integers(1, 5),
    st.integers(1, 4),
    st.integers(1, 3),
    st.sampled_from([(1, 2), (2, 4), (3, 8)]),
    st.integers(0, 99),
)
def test_the_nm_form_stores_n_slots_per_group_and_round_trips(out_dim, groups, kernel, nm, seed):
    n, m = nm
    shape = (out_dim, groups * m, kernel)
    scores = torch.rand(out_dim, groups, kernel, m, generator=torch.Generator().manual_seed(seed))
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.argsort(-1)[..., :n], True)
    nonzero = keep.transpose(2, 3).reshape(shape).numpy().reshape(-1)
    layout = next(c for c in layouts(nonzero, shape) if c.form == "nm" and c.params["m"] == m)
    assert layout.params == {"n": n, "m": m}
    symbols, bits = layout.positions[0]
    assert bits == m.bit_length() - 1 and symbols.size == out_dim * groups * kernel * n
    assert sorted(decode_positions("nm", layout.params, shape, [symbols]).tolist()) == np.flatnonzero(nonzero).tolist()


def test_tied_weights_are_stored_once(tmp_path):
    def build():
        model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50, bias=False))
        model[1].weight = model[0].weight
        return model

    model = build()
    report = pk.save_pruned(model, tmp_path / "m.pk", sparse=True)
    assert [t.form for t in report.tensors][1] == "alias of 0.weight"
    loaded = pk.load_pruned(build(), tmp_path / "m.pk")
    assert torch.equal(loaded[1].weight, model[0].weight)


def test_zlib_codec_without_zstandard_still_round_trips(tmp_path):
    model = Net()
    pk.prune(model, sparsity=0.7)
    report = pk.save_pruned(model, tmp_path / "m.pk", sparse=True, codec="zlib")
    assert report.codec == "zlib" and all("zstd" not in t.coders for t in report.tensors)
    loaded = pk.load_pruned(Net(), tmp_path / "m.pk")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------- compacted models


def compacted():
    torch.manual_seed(1)
    model = Net()
    x = torch.randn(2, 3, 8, 8)
    pk.prune(model, sparsity=0.5, granularity="out_channel", example_inputs=x, exclude=["fc2"])
    small = pk.compact(model, example_inputs=x)
    return small.eval(), x


@pytest.mark.parametrize("weight_bits", [None, 6])
def test_a_compacted_model_saves_with_its_plan_and_compresses(tmp_path, weight_bits):
    small, x = compacted()
    report = pk.save_pruned(small, tmp_path / "small.pk", sparse=True, weight_bits=weight_bits)
    assert report.has_plan
    expected = pk.share_weights(small, weight_bits) if weight_bits else small
    loaded = pk.load_pruned(Net(), tmp_path / "small.pk").eval()
    assert loaded.prunekit_plan == small.prunekit_plan
    assert loaded.fc1.in_features == small.fc1.in_features < 8 * 6 * 6
    with torch.no_grad():
        assert torch.equal(loaded(x), expected(x))


# ---------------------------------------------------------------------------------------- refusals


def saved(tmp_path, **options) -> Path:
    model = Net()
    pk.prune(model, sparsity=0.8)
    path = tmp_path / "m.pk"
    pk.save_pruned(model, path, sparse=True, **options)
    return path


@pytest.mark.parametrize("fmt", ["m.pk", "m.pt", "m.safetensors"])
def test_a_file_from_another_architecture_is_refused_and_the_model_is_unchanged(tmp_path, fmt):
    """Defect 12 of issue 10: a compacted model's file loaded into a model with another classifier size
    used to apply the plan, then fail in load_state_dict, leaving a sliced, half-loaded model."""
    if fmt.endswith(".safetensors"):
        pytest.importorskip("safetensors")
    small, _ = compacted()
    path = tmp_path / fmt
    pk.save_pruned(small, path, sparse=fmt.endswith(".pk"))
    other = Net(classes=7)
    other.fc1.register_forward_hook(lambda *args: None)
    other.conv.weight.requires_grad_(False)
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"another architecture.*fc2\.weight: saved \(5, 16\), model \(7, 16\)"):
        pk.load_pruned(other, path)
    assert_unchanged(other, before)
    assert not hasattr(other, "prunekit_plan")


def test_a_failure_after_the_plan_is_applied_puts_the_model_back(tmp_path, monkeypatch):
    small, _ = compacted()
    pk.save_pruned(small, tmp_path / "m.pt")
    fresh = Net()
    before = snapshot(fresh)

    def broken(*args, **kwargs):
        raise RuntimeError("load_state_dict failed")

    monkeypatch.setattr(nn.Module, "load_state_dict", broken)
    with pytest.raises(RuntimeError, match="load_state_dict failed"):
        pk.load_pruned(fresh, tmp_path / "m.pt")
    assert_unchanged(fresh, before)


def test_corruption_at_any_byte_is_refused_and_the_model_is_unchanged(tmp_path):
    model = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2))
    pk.prune(model, sparsity=0.6)
    path = tmp_path / "m.pk"
    pk.save_pruned(model, path, sparse=True, weight_bits={"linear": 3, "bias": 4})
    data = path.read_bytes()
    target = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2))
    before = snapshot(target)
    broken = tmp_path / "broken.pk"
    for index in range(len(data)):
        broken.write_bytes(data[:index] + bytes([data[index] ^ 0x41]) + data[index + 1 :])
        with pytest.raises(ValueError, match="corrupt|version|not a compressed|truncated|longer|not a file written"):
            pk.load_pruned(target, broken)
    for length in (0, 5, 12, 20, len(data) // 2, len(data) - 1):
        broken.write_bytes(data[:length])
        with pytest.raises(ValueError, match="truncated|not a compressed|corrupt|not a file written"):
            pk.load_pruned(target, broken)
    assert_unchanged(target, before)


def test_an_unknown_format_version_is_refused(tmp_path):
    import hashlib

    path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, FORMAT_VERSION + 1)
    data[-32:] = hashlib.sha256(bytes(data[:-32])).digest()
    path.write_bytes(bytes(data))
    target = Net()
    before = snapshot(target)
    with pytest.raises(
        CompressedFileError, match=f"version {FORMAT_VERSION + 1}; this prunekit reads version {FORMAT_VERSION}"
    ):
        pk.load_pruned(target, path)
    assert_unchanged(target, before)


def test_options_that_need_a_compressed_file_are_refused_without_it(tmp_path):
    model = Net()
    with pytest.raises(ValueError, match="weight_bits apply to compressed files only; pass sparse=True"):
        pk.save_pruned(model, tmp_path / "m.pt", weight_bits=5)
    with pytest.raises(ValueError, match="codec apply to compressed files only"):
        pk.save_pruned(model, tmp_path / "m.pt", codec="zlib")
    with pytest.raises(ValueError, match="not safetensors"):
        pk.save_pruned(model, tmp_path / "m.safetensors", sparse=True)
    with pytest.raises(ValueError, match="codec must be one of"):
        pk.save_pruned(model, tmp_path / "m.pk", sparse=True, codec="lzma")
    with pytest.raises(TypeError):
        pk.save_pruned(model, tmp_path / "m.pk", sparse=True, bits=5)
    assert not any(tmp_path.iterdir())


def test_a_meta_model_is_refused_before_writing(tmp_path):
    with torch.device("meta"):
        model = Net()
    with pytest.raises(ValueError, match="meta device"):
        pk.save_pruned(model, tmp_path / "m.pk", sparse=True)
    assert not any(tmp_path.iterdir())


def test_inspect_file_refuses_other_files(tmp_path):
    torch.save({"a": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CompressedFileError, match="not a compressed prunekit file"):
        inspect_file(tmp_path / "plain.pt")


def test_loading_a_copy_leaves_the_original_untouched(tmp_path):
    path = saved(tmp_path, weight_bits=4)
    fresh = Net()
    twin = copy.deepcopy(fresh)
    pk.load_pruned(fresh, path)
    assert not torch.equal(fresh.fc1.weight, twin.fc1.weight)


def test_a_failed_load_of_compacted_attention_restores_the_module_class(tmp_path, monkeypatch):
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 16)
            self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            h = self.embed(x)
            return self.head(h + self.attention(h, h, h)[0])

    torch.manual_seed(0)
    model = Attend().eval()
    x = torch.randn(2, 5, 6)
    pk.prune(model, 0.5, criterion="l2", granularity="out_channel", example_inputs=x)
    small = pk.compact(model, x)
    assert small.attention.num_heads < 4
    pk.save_pruned(small, tmp_path / "small.pk", sparse=True)
    fresh = Attend()
    before = snapshot(fresh)
    monkeypatch.setattr(nn.Module, "load_state_dict", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        pk.load_pruned(fresh, tmp_path / "small.pk")
    assert type(fresh.attention) is nn.MultiheadAttention and fresh.attention.num_heads == 4
    assert_unchanged(fresh, before)
    monkeypatch.undo()
    loaded = pk.load_pruned(fresh, tmp_path / "small.pk").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
