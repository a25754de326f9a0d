"""One rank of tests/test_distributed.py: prune DDP models with every criterion, each rank on its own
batches, and save the masks (``python distributed_worker.py RANK WORLD PORT OUT_DIR``)."""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import prunekit as pk


@pk.register_criterion("obd_test")
class OBDDiagonal(pk.Criterion):
    """w² · Σ x_j² / 2, read from calibration statistics (LeCun et al. 1990, Gauss-Newton diagonal)."""

    name = "obd_test"
    statistics = ("input_sq_norm",)

    def score(self, target):
        return target.scoring_weight().square() * self.calibration_statistics[target.full_name]["input_sq_norm"] / 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def rank_batches(rank: int, count: int = 3):
    generator = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(6, 8, generator=generator), torch.randint(4, (6,), generator=generator)) for _ in range(count)]


def train_and_prune(criterion: str, scope: str, batches) -> dict:
    model = DDP(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = pk.Pruner(model, 0.6, criterion=criterion, scope=scope, schedule=pk.Gradual(0, 4, every=2))
    for inputs, labels in batches * 2:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        pruner.step()
    return {**pruner.masks, "weights": {k: v.detach().clone() for k, v in model.module.state_dict().items()}}


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    batches = rank_batches(rank)
    results = {}
    for scope in ("local", "global"):
        results[f"magnitude-{scope}"] = pk.prune(DDP(make_model()), 0.5, scope=scope).masks
        results[f"random-{scope}"] = pk.prune(DDP(make_model()), 0.5, criterion="random", seed=rank, scope=scope).masks
        results[f"gradient-data-{scope}"] = pk.prune(
            DDP(make_model()), 0.5, criterion="gradient", data=batches, loss_fn=F.cross_entropy, scope=scope
        ).masks
        results[f"calibration-{scope}"] = pk.prune(
            DDP(make_model()), 0.5, criterion="obd_test", calibration=[x for x, _ in batches], scope=scope
        ).masks
        for criterion in ("gradient", "movement"):
            results[f"{criterion}-training-{scope}"] = train_and_prune(criterion, scope, batches)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
