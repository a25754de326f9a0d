"""Pruning under FSDP2 (``fully_shard`` per layer and at the root, uneven shards): two CPU processes
(gloo) get, once gathered, exactly the masks one process gets on the unsharded model, for local and
global scope, magnitude (L1, L2), random, gradient and calibration criteria, weights, output channels
and 2:4; training keeps the pruned weights at zero; what needs the whole model is refused."""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.core import masks as mask_store
from prunekit.core.sharding import check_shardable, local_rows

pytestmark = pytest.mark.slow  # two new processes that import torch (in CI, like every slow test)

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import fsdp_worker as worker  # noqa: E402
from ranks import run_until_rendezvous  # noqa: E402

TRAINED = [f"{c}-training-{s}" for c in ("gradient", "movement") for s in ("local", "global")]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    results = run_until_rendezvous(HELPERS / "fsdp_worker.py", out)
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{log}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def whole_masks(state: dict) -> dict[str, torch.Tensor]:
    return {name: mask_store.unpack_mask(packed, state["shapes"][name]) for name, packed in state["masks"].items()}


def reference(name: str) -> tuple[pk.Pruner, nn.Module]:
    model = worker.make_model()
    if name in TRAINED:
        criterion, _, scope = name.split("-")
        return worker.train(model, criterion, scope), model
    return pk.prune(model, **worker.case_options(name)), model


@pytest.mark.parametrize("name", [*worker.CASES, *TRAINED])
def test_sharded_masks_equal_the_unsharded_ones(rank_results, name):
    pruner, model = reference(name)
    expected = whole_masks(pruner.state_dict())
    assert {"0.weight", "2.weight"} <= set(expected)
    for rank in range(2):
        found = rank_results[rank][name]
        masks = whole_masks(found["state"])
        assert set(masks) == set(expected)
        for key in expected:
            assert torch.equal(masks[key], expected[key]), f"{name}: {key} differs on rank {rank}"
        assert found["sparsity"] == pruner.sparsity  # every rank's shards counted
        assert found["nonzero"] == pk.summary(model).nonzero_params
        assert found["unit_sparsity"] == pruner.unit_sparsity
    if name.endswith("global") and "out_channel" not in name:  # one ranking over the layers: uneven per layer
        per_layer = {round(1 - float(m.float().mean()), 2) for m in expected.values()}
        assert len(per_layer) > 1


@pytest.mark.parametrize("name", TRAINED)
def test_training_keeps_pruned_weights_at_zero_and_matches_unsharded_training(rank_results, name):
    _, model = reference(name)
    for rank in range(2):
        found = rank_results[rank][name]
        masks = whole_masks(found["state"])
        for key, keep in masks.items():
            weight = found["weights"][key]
            assert not weight[~keep].any(), f"{name}: pruned weights of {key} are not zero on rank {rank}"
            # SGD on identical batches: FSDP's mean of the ranks' equal gradients is that gradient.
            assert torch.allclose(weight, dict(model.named_parameters())[key].detach(), atol=1e-6)


def test_gradient_sums_follow_the_schedule(rank_results):
    """Movement keeps its sums across events, gradient resets them: the saved sums are whole."""
    movement = rank_results[0]["movement-training-global"]["state"]["criterion"]
    expected = reference("movement-training-global")[0].state_dict()["criterion"]
    assert set(movement["sums"]) == set(expected["sums"])
    for key, value in expected["sums"].items():
        # FSDP's reduced gradient is the ranks' mean; the sums count it once per rank, as DDP sums ranks.
        assert torch.allclose(movement["sums"][key], 2 * value, rtol=1e-5, atol=1e-6)


def test_a_whole_state_loads_into_a_sharded_pruner(rank_results):
    for rank in range(2):
        loaded = whole_masks(rank_results[rank]["loaded"]["state"])
        saved = whole_masks(rank_results[rank]["magnitude-global"]["state"])
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
        assert rank_results[rank]["loaded"]["sparsity"] == rank_results[rank]["magnitude-global"]["sparsity"]


def test_what_needs_the_whole_model_is_refused(rank_results):
    for rank in range(2):
        refused = rank_results[rank]["refusals"]
        assert "prune (and compact) the model before sharding" in refused["coupled"]
        assert "prune the unsharded model" in refused["sparsegpt"]
        assert "[MODEL CHANGED]" not in refused["coupled"] + refused["sparsegpt"]


def test_fsdp1_is_refused_with_what_to_do():
    from torch.distributed.fsdp import FullyShardedDataParallel

    class Wrapped(FullyShardedDataParallel):
        def __init__(self, module):  # no process group needed to recognise the wrapper
            nn.Module.__init__(self)
            self.inner = module

    model = nn.Sequential(Wrapped(nn.Linear(4, 4)))
    before = model[0].inner.weight.detach().clone()
    with pytest.raises(ValueError, match="FSDP1.*fully_shard"):
        pk.Pruner(model, 0.5)
    assert torch.equal(model[0].inner.weight, before)
    assert check_shardable(nn.Linear(2, 2)) is False


def test_local_rows_split_rows_as_torch_chunk():
    """Shard(0) over W ranks gives rank r rows [r·c, min(n, (r+1)·c)), c = ⌈n / W⌉ (hand-computed)."""

    class FakeMesh:
        def __init__(self, rank):
            self.rank = rank

        def size(self):
            return 2

        def get_local_rank(self):
            return self.rank

    class FakeShard:
        def __init__(self, rows, rank):
            self.shape = torch.Size([rows, 3])
            self.device_mesh = FakeMesh(rank)
            chunk = math.ceil(rows / 2)
            self._local = torch.empty(max(0, min(rows, (rank + 1) * chunk) - min(rows, rank * chunk)), 3)

        def to_local(self):
            return self._local

    from prunekit.core import sharding

    whole = torch.arange(21).reshape(7, 3)
    original = sharding.is_sharded
    sharding.is_sharded = lambda tensor: isinstance(tensor, FakeShard)
    try:
        assert torch.equal(local_rows(whole, FakeShard(7, 0)), whole[:4])
        assert torch.equal(local_rows(whole, FakeShard(7, 1)), whole[4:])
        assert sharding.row_range(FakeShard(1, 1)) == (1, 1)  # one row: the second rank holds none
    finally:
        sharding.is_sharded = original
