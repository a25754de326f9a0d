"""Sparse execution (prunekit.sparse): outputs equal the masked dense model's, to_dense undoes to_sparse
exactly, state dicts keep the dense keys, training through a sparse layer raises, bad options leave the
model unchanged. Kernels are forced (no test depends on timing); "auto" is checked for its outputs only."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit.sparse import SparseConv2d, SparseLinear, block_size, is_two_four

FAST = settings(max_examples=25, deadline=None)


def _sparse_weight(generator: torch.Generator, rows: int, cols: int, density: float) -> torch.Tensor:
    """Random weights with about ``density`` kept, one row fully dense and one fully pruned (when there are
    rows enough), so CSR's empty and full rows are exercised."""
    weight = torch.randn(rows, cols, generator=generator)
    weight *= torch.rand(rows, cols, generator=generator) < density
    if rows >= 2:
        weight[0] = torch.randn(cols, generator=generator)
        weight[-1] = 0
    return weight


def _close(expected: torch.Tensor, actual: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@FAST
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    batch=st.sampled_from([1, 3, 7]),
    tokens=st.sampled_from([None, 1, 5]),
    bias=st.booleans(),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_csr_linear_equals_dense(rows, cols, batch, tokens, bias, density, seed):
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(_sparse_weight(generator, rows, cols, density))
    shape = (batch, cols) if tokens is None else (batch, tokens, cols)
    x = torch.randn(shape, generator=generator)
    sparse = SparseLinear(layer, "csr")
    with torch.no_grad():
        _close(layer(x), sparse(x))
        _close(layer(x), SparseLinear(layer, "csr-linear")(x))
    dense = sparse.to_dense()
    assert type(dense) is nn.Linear and torch.equal(dense.weight, layer.weight)
    assert (dense.bias is None) == (not bias) and (not bias or torch.equal(dense.bias, layer.bias))


@FAST
@given(
    tiles=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    block=st.sampled_from([(2, 2), (4, 4), (8, 8)]),
    batch=st.sampled_from([1, 4, 9]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bsr_linear_equals_dense(tiles, block, batch, bias, seed):
    generator = torch.Generator().manual_seed(seed)
    rows, cols = tiles[0] * block[0], tiles[1] * block[1]
    keep = torch.rand(tiles, generator=generator) < 0.5
    keep[0, 0] = True
    weight = torch.randn(rows, cols, generator=generator) * keep.repeat_interleave(block[0], 0).repeat_interleave(
        block[1], 1
    )
    layer = nn.Linear(cols, rows, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
    sparse = SparseLinear(layer, "bsr", block)
    x = torch.randn(batch, cols, generator=generator)
    with torch.no_grad():
        _close(layer(x), sparse(x))
    assert torch.equal(sparse.to_dense().weight, layer.weight)


@FAST
@given(
    channels=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    kernel_size=st.sampled_from([1, 2, 3]),
    stride=st.sampled_from([1, 2]),
    padding=st.sampled_from([0, 1]),
    dilation=st.sampled_from([1, 2]),
    batch=st.sampled_from([1, 3]),
    unbatched=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_csr_conv2d_equals_dense(channels, kernel_size, stride, padding, dilation, batch, unbatched, bias, seed):
    generator = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(channels[0], channels[1], kernel_size, stride, padding, dilation, bias=bias)
    with torch.no_grad():
        flat = _sparse_weight(generator, channels[1], channels[0] * kernel_size**2, 0.3)
        conv.weight.copy_(flat.reshape(conv.weight.shape))
    x = torch.randn(channels[0], 9, 8, generator=generator)
    x = x if unbatched else torch.stack([x] * batch) + torch.randn(batch, *x.shape, generator=generator)
    sparse = SparseConv2d(conv, "csr")
    with torch.no_grad():
        _close(conv(x), sparse(x))
    dense = sparse.to_dense()
    assert type(dense) is nn.Conv2d and torch.equal(dense.weight, conv.weight)
    assert (dense.stride, dense.padding, dense.dilation) == (conv.stride, conv.padding, conv.dilation)


def test_hf_conv1d_round_trip():
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(12, 8)  # (in 8, out 12), weight stored (8, 12)
    with torch.no_grad():
        conv1d.weight.mul_(torch.rand(conv1d.weight.shape) < 0.3)
        conv1d.bias.normal_()
    x = torch.randn(2, 5, 8)
    sparse = SparseLinear(conv1d, "csr")
    with torch.no_grad():
        _close(conv1d(x), sparse(x))
    dense = sparse.to_dense()
    assert type(dense) is type(conv1d) and dense.weight.shape == (8, 12)
    assert torch.equal(dense.weight, conv1d.weight) and dense.weight.is_contiguous()
    assert set(sparse.state_dict()) == {"weight", "bias"} and torch.equal(sparse.state_dict()["weight"], conv1d.weight)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    pk.prune(model, sparsity=0.8, granularity="weight").remove()
    return model


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )
    pk.prune(model, sparsity=0.7, granularity="weight").remove()
    return model


def test_to_sparse_forced_csr_model_equals_and_to_dense_restores():
    model = _cnn()
    x = torch.randn(3, 3, 6, 6)
    fast = pk.to_sparse(model, x, kernel="csr")
    kinds = [type(m).__name__ for m in fast]
    assert kinds == ["SparseConv2d", "ReLU", "SparseConv2d", "ReLU", "Conv2d", "Flatten", "SparseLinear"]
    assert "grouped convolution" in fast.prunekit_sparse.layers["4"].reason
    assert all(type(m) is not SparseLinear for m in model)  # the original is untouched
    with torch.no_grad():
        _close(model(x), fast(x))
    dense = pk.to_dense(fast)
    assert [type(m) for m in dense] == [type(m) for m in model]
    for (name, expected), (other, actual) in zip(model.state_dict().items(), dense.state_dict().items()):
        assert name == other and torch.equal(expected, actual)
    assert all(p.requires_grad for p in dense.parameters())
    assert not hasattr(dense, "prunekit_sparse")


@pytest.mark.filterwarnings("ignore:the whole model ran")
def test_auto_keeps_outputs_whatever_it_chooses():
    model = _mlp()
    x = torch.randn(16, 20)
    fast = pk.to_sparse(model, x, rounds=2, clock=time.thread_time)
    report = fast.prunekit_sparse
    assert set(report.layers) == {"0", "2", "4"} and report.batch == 16
    assert all(choice.kernel in ("csr", "csr-linear", "bsr", "dense") for choice in report.layers.values())
    with torch.no_grad():
        _close(model(x), fast(x))


def test_gpt2_conv1d_layers_run_sparse_and_exclude_keeps_named_layers_dense():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)).eval()
    pk.prune(model, sparsity=0.8, granularity="weight", exclude=["lm_head"]).remove()
    inputs = {"input_ids": torch.randint(0, 100, (2, 7))}
    fast = pk.to_sparse(model, inputs, kernel="csr", exclude=["transformer.h.1.*"])
    assert type(fast.transformer.h[0].mlp.c_fc) is SparseLinear and fast.transformer.h[0].mlp.c_fc.transposed
    assert type(fast.transformer.h[1].attn.c_attn).__name__ == "Conv1D"
    assert fast.prunekit_sparse.layers["transformer.h.1.mlp.c_proj"].reason == "excluded"
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="match no module"):
        pk.to_sparse(model, inputs, exclude=["decoder.*"])


def test_auto_leaves_a_layer_without_zeros_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    fast = pk.to_sparse(model, torch.randn(2, 8), rounds=1)
    assert type(fast[0]) is nn.Linear and fast.prunekit_sparse.layers["0"].reason == "no zero weights"


def test_inplace_swaps_the_model_itself():
    model = _mlp()
    result = pk.to_sparse(model, torch.randn(4, 20), kernel="csr", inplace=True)
    assert result is model and type(model[0]) is SparseLinear
    assert pk.to_dense(model, inplace=True) is model and type(model[0]) is nn.Linear


def test_pruner_mask_buffer_and_hooks_come_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    pk.prune(model, sparsity=0.5, granularity="weight")  # keeps its packed mask buffer on the layer
    buffers = dict(model[0].named_buffers())
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append(1))
    dense = pk.to_dense(pk.to_sparse(model, torch.randn(2, 16), kernel="csr"))
    assert dict(dense[0].named_buffers()).keys() == buffers.keys()
    for name, buffer in buffers.items():
        assert torch.equal(dict(dense[0].named_buffers())[name], buffer)
    dense(torch.randn(1, 16))
    assert calls  # the layer's forward hook is back with it


def test_bsr_detected_for_block_pruning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    pk.prune(model, sparsity=0.75, granularity=pk.Block(4, 4)).remove()
    assert block_size(model[0].weight.detach()) == (4, 4)
    x = torch.randn(5, 64)
    fast = pk.to_sparse(model, x, kernel="bsr")
    assert type(fast[0]) is SparseLinear and fast[0].blocksize == (4, 4)
    with torch.no_grad():
        _close(model(x), fast(x))


def test_non_square_blocks_are_refused_on_cpu():
    with pytest.raises(ValueError, match="square blocks"):
        SparseLinear(nn.Linear(4, 8), "bsr", (4, 1))


def test_block_size_by_hand():
    weight = torch.zeros(4, 8)
    weight[0:2, 0:2] = 1.0
    weight[2:4, 4:6] = 2.0
    assert block_size(weight) == (2, 2)  # two full 2×2 tiles; 4×4 tiles would be 25% full
    weight[0, 7] = 1.0  # a lone weight: 2×2 tiles now 9 / 12 = 75% full, still enough
    assert block_size(weight) == (2, 2)
    assert block_size(torch.eye(6)) is None
    assert block_size(torch.zeros(4, 4)) is None


def test_is_two_four():
    weight = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3], [0, 1, 1, 0, 1, 1, 0, 0]])
    assert is_two_four(weight)
    weight[0, 1] = 5.0
    assert not is_two_four(weight)
    assert not is_two_four(torch.zeros(2, 6))  # 6 inputs do not split into runs of 4


def test_csr_linear_is_for_linear_layers():
    model = _cnn()
    fast = pk.to_sparse(model, torch.randn(2, 3, 6, 6), kernel="csr-linear")
    assert type(fast[0]) is nn.Conv2d and "Linear and Conv1D layers only" in fast.prunekit_sparse.layers["0"].reason
    assert type(fast[6]) is SparseLinear and fast[6].kernel == "csr-linear"
    with pytest.raises(ValueError, match="for Linear layers"):
        SparseConv2d(model[0], "csr-linear")


def test_forced_bsr_on_unstructured_weights_stays_dense_with_reason():
    model = _mlp()
    fast = pk.to_sparse(model, torch.randn(2, 20), kernel="bsr")
    assert all(type(m) is not SparseLinear for m in fast)
    assert "tiles" in fast.prunekit_sparse.layers["0"].reason


def test_state_dict_keeps_the_dense_keys_and_loads_both_ways():
    model = _mlp()
    fast = pk.to_sparse(model, torch.randn(2, 20), kernel="csr")
    state = fast.state_dict()
    assert list(state) == list(model.state_dict())
    fresh = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    fresh.load_state_dict(state)
    other = _mlp(seed=1)
    fast.load_state_dict(other.state_dict())
    x = torch.randn(3, 20)
    with torch.no_grad():
        _close(fresh(x), model(x))
        _close(other(x), fast(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        fast.load_state_dict({**other.state_dict(), "0.weight": torch.zeros(3, 3)})


def test_deepcopy_and_torch_save_of_a_sparse_model(tmp_path):
    model = _mlp()
    fast = pk.to_sparse(model, torch.randn(2, 20), kernel="csr")
    twin = copy.deepcopy(fast)
    assert twin[0].weight_sparse is not fast[0].weight_sparse
    torch.save(fast, tmp_path / "fast.pt")
    loaded = torch.load(tmp_path / "fast.pt", weights_only=False)
    x = torch.randn(2, 20)
    with torch.no_grad():
        _close(fast(x), twin(x))
        _close(fast(x), loaded(x))
    assert torch.equal(pk.to_dense(loaded)[0].weight, model[0].weight)


def test_training_through_a_sparse_layer_raises():
    fast = pk.to_sparse(_mlp(), torch.randn(2, 20), kernel="csr")
    x = torch.randn(2, 20, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only.*to_dense"):
        fast(x)
    with torch.no_grad():
        fast(x)
    fast(torch.randn(2, 20))  # gradients enabled but nothing to differentiate: runs
    assert list(fast[0].parameters()) == []


def test_bad_options_raise_and_leave_the_model_unchanged():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 20)
    with pytest.raises(ValueError, match="kernel must be one of"):
        pk.to_sparse(model, x, kernel="coo", inplace=True)
    with pytest.raises(ValueError, match="min_gain"):
        pk.to_sparse(model, x, min_gain=0, inplace=True)
    with pytest.raises(ValueError, match="rounds"):
        pk.to_sparse(model, x, rounds=0, inplace=True)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pk.to_sparse("model", x)
    with pytest.raises(TypeError, match="clock"):
        pk.to_sparse(model, x, clock=1.0, inplace=True)
    with pytest.raises(TypeError, match="exclude"):
        pk.to_sparse(model, x, exclude=[0], inplace=True)
    fast = pk.to_sparse(model, x, kernel="csr")
    with pytest.raises(ValueError, match="already has sparse layers"):
        pk.to_sparse(fast, x)
    with pytest.raises(RuntimeError):
        pk.to_sparse(model, torch.randn(2, 7), kernel="csr", inplace=True)  # the model fails on these inputs
    assert all(type(m) is not SparseLinear for m in model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_summary_names_kernels_and_keeps_counts():
    model = _cnn()
    x = torch.randn(2, 3, 6, 6)
    fast = pk.to_sparse(model, x, kernel="csr")
    dense_rows, sparse_rows = pk.summary(model, x).layers, pk.summary(fast, x).layers
    assert [r.name for r in dense_rows] == [r.name for r in sparse_rows]
    for dense, sparse in zip(dense_rows, sparse_rows):
        assert (dense.params, dense.nonzero_params, dense.macs, dense.nonzero_macs) == (
            sparse.params,
            sparse.nonzero_params,
            sparse.macs,
            sparse.nonzero_macs,
        )
    assert sparse_rows[0].kind == "SparseConv2d [csr (forced)]"
    text = str(pk.summary(fast))
    assert "SparseLinear [csr (forced)]" in text and "to_sparse: 4 layers considered (3 csr, 1 dense)" in text


def test_summary_reports_measured_gain():
    fast = pk.to_sparse(_mlp(), torch.randn(8, 20), kernel="csr")
    fast[0].measured_gain, fast[0].measured_batch = 2.4, 16  # as "auto" records them
    assert "SparseLinear [csr ×2.40 at batch 16]" in str(pk.summary(fast))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA")
def test_semi_structured_on_cuda_equals_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128)).half().cuda()
    pk.prune(model, granularity=pk.NM(2, 4)).remove()
    x = torch.randn(32, 128, device="cuda", dtype=torch.half)
    fast = pk.to_sparse(model, x, kernel="semi")
    assert type(fast[0]) is SparseLinear and fast[0].kernel == "semi"
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-2, atol=1e-2)
    assert torch.equal(pk.to_dense(fast)[0].weight, model[0].weight)
