"""One rank of tests/test_fsdp.py: prune FSDP2 models (``fully_shard`` per layer and at the root,
uneven shards) and save the whole masks and weights (``python fsdp_worker.py RANK WORLD PORT OUT_DIR``).
Both ranks get the same batches, so the unsharded model pruned in one process is the reference."""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import prunekit as pk


@pk.register_criterion("obd_fsdp_test")
class OBDDiagonal(pk.Criterion):
    """w² · Σ x_j² / 2, read from calibration statistics (LeCun et al. 1990, Gauss-Newton diagonal)."""

    name = "obd_fsdp_test"
    statistics = ("input_sq_norm",)

    def score(self, target):
        return target.scoring_weight().square() * self.calibration_statistics[target.full_name]["input_sq_norm"] / 2


def make_model() -> nn.Module:
    """12, 7 and 3 output rows: on two ranks 6+6, 4+3 and 2+1 rows."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 3))


def batches(count: int = 3):
    generator = torch.Generator().manual_seed(7)
    return [(torch.randn(6, 8, generator=generator), torch.randint(3, (6,), generator=generator)) for _ in range(count)]


#: name → (pk.prune keyword arguments); "seed" is replaced by the rank on the sharded side.
CASES = {
    "magnitude-local": dict(sparsity=0.5),
    "magnitude-global": dict(sparsity=0.6, scope="global"),
    "l2-out_channel-global": dict(sparsity=0.4, criterion="l2", granularity="out_channel", scope="global"),
    "magnitude-out_channel-local": dict(sparsity=0.5, granularity="out_channel"),
    "magnitude-2:4": dict(granularity="2:4", exclude=["4"]),
    "random-local": dict(sparsity=0.5, criterion="random", seed=0),
    "random-global": dict(sparsity=0.5, criterion="random", scope="global", seed=0),
    "gradient-data-local": dict(sparsity=0.5, criterion="gradient", loss_fn=F.cross_entropy),
    "gradient-data-global": dict(sparsity=0.5, criterion="gradient", scope="global", loss_fn=F.cross_entropy),
    "calibration-global": dict(sparsity=0.5, criterion="obd_fsdp_test", scope="global"),
}


def case_options(name: str) -> dict:
    options = dict(CASES[name])
    if name.startswith("gradient-data"):
        options["data"] = batches()
    if name.startswith("calibration"):
        options["calibration"] = [x for x, _ in batches()]
    return options


def train(model: nn.Module, criterion: str, scope: str) -> pk.Pruner:
    """Four SGD steps, pruning at steps 2 and 4 with masks enforced by the attached optimizer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = pk.Pruner(
        model, 0.6, criterion=criterion, scope=scope, schedule=pk.Gradual(0, 4, every=2), optimizer=optimizer
    )
    for inputs, labels in batches() + batches()[:1]:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        pruner.step()
    return pruner


def shard(model: nn.Module, mesh) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def whole_weights(model: nn.Module) -> dict:
    return {name: param.detach().full_tensor().clone() for name, param in model.named_parameters()}


def record(pruner: pk.Pruner, model: nn.Module) -> dict:
    state = pruner.state_dict()  # the masks gathered whole
    units = pruner.unit_sparsity
    return {
        "state": state,
        "sparsity": pruner.sparsity,
        "unit_sparsity": units,
        "nonzero": pk.summary(model).nonzero_params,
        "weights": whole_weights(model),
    }


def refusals(mesh) -> dict:
    found = {}
    attempts = {
        "coupled": dict(sparsity=0.5, granularity="out_channel", example_inputs=torch.randn(2, 8)),
        "sparsegpt": dict(sparsity=0.5, criterion="sparsegpt", calibration=[torch.randn(4, 8)]),
    }
    for name, options in attempts.items():
        model = shard(make_model(), mesh)
        before = whole_weights(model)
        try:
            pk.prune(model, **options)
            found[name] = "no error"
        except ValueError as error:
            unchanged = all(torch.equal(before[k], v) for k, v in whole_weights(model).items())
            found[name] = str(error) + ("" if unchanged else " [MODEL CHANGED]")
    return found


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name in CASES:
        options = case_options(name)
        if "seed" in options:
            options["seed"] = rank  # every rank takes rank 0's draw
        model = shard(make_model(), mesh)
        results[name] = record(pk.prune(model, **options), model)
    for criterion in ("gradient", "movement"):
        for scope in ("local", "global"):
            model = shard(make_model(), mesh)
            results[f"{criterion}-training-{scope}"] = record(train(model, criterion, scope), model)
    # A whole saved state loads into a fresh sharded pruner: its local masks are its rows of the saved ones.
    model = shard(make_model(), mesh)
    pruner = pk.Pruner(model, 0.6, scope="global")
    pruner.load_state_dict(results["magnitude-global"]["state"])
    results["loaded"] = record(pruner, model)
    results["refusals"] = refusals(mesh)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
