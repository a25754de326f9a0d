"""Pruning under DistributedDataParallel: two CPU processes (gloo), each on its own batches, get the same
masks for every criterion, local and global; data-dependent scores are summed over the ranks."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import prunekit as pk

pytestmark = pytest.mark.slow  # two new processes that import torch (in CI, like every slow test)

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import distributed_worker as worker  # noqa: E402
from ranks import run_until_rendezvous  # noqa: E402

CASES = [
    f"{name}-{scope}"
    for scope in ("local", "global")
    for name in ("magnitude", "random", "gradient-data", "calibration", "gradient-training", "movement-training")
]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    results = run_until_rendezvous(HELPERS / "distributed_worker.py", out)
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{log}"
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("case", CASES)
def test_every_rank_gets_the_same_masks(rank_results, case):
    first, second = rank_results[0][case], rank_results[1][case]
    assert set(first) == set(second) and {"0.weight", "2.weight"} <= set(first)
    for name in first:
        if name == "weights":
            continue
        assert torch.equal(first[name], second[name]), f"{case}: {name} differs between ranks"
        assert 0.3 < 1 - first[name].float().mean() < 0.7 or case.endswith("global")
    if "weights" in first:  # training kept the replicas identical, pruned weights at zero
        for key, value in first["weights"].items():
            assert torch.equal(value, second["weights"][key])


def test_gradient_scores_are_summed_over_the_ranks(rank_results):
    """The DDP masks are those of one process scoring all ranks' batches, and each rank alone would
    have chosen differently (so the agreement is not a coincidence of the data)."""

    def alone(batches):
        return pk.prune(worker.make_model(), 0.5, criterion="gradient", data=batches, loss_fn=F.cross_entropy).masks

    both = alone(worker.rank_batches(0) + worker.rank_batches(1))
    rank0, rank1 = alone(worker.rank_batches(0)), alone(worker.rank_batches(1))
    ddp = rank_results[0]["gradient-data-local"]
    for name in both:
        assert float((ddp[name] == both[name]).float().mean()) > 0.98  # the order of float sums differs
        assert not torch.equal(rank0[name], rank1[name])


def test_the_ddp_wrapper_is_unwrapped_without_a_process_group():
    model = worker.make_model()
    wrapped = torch.nn.DataParallel(model)
    pruner = pk.prune(wrapped, 0.5)
    assert pruner.model is model and set(pruner.masks) == {"0.weight", "2.weight"}
