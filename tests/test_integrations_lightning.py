"""prunekit.integrations.lightning.PruningCallback with the real Lightning Trainer on a tiny
LightningModule (CPU, a few steps)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk

L = pytest.importorskip("lightning.pytorch")
from prunekit.integrations.lightning import PruningCallback  # noqa: E402


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        self.optimizer_steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return F.cross_entropy(self(inputs), labels)

    def optimizer_step(self, *args, **kwargs):
        self.optimizer_steps += 1
        return super().optimizer_step(*args, **kwargs)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader(size=64):
    generator = torch.Generator().manual_seed(1)
    inputs, labels = torch.randn(size, 8, generator=generator), torch.randint(4, (size,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=4)


def fit(callback, tmp_path, max_steps, ckpt_path=None, extra=(), data_size=64, **options):
    options.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=L.loggers.CSVLogger(tmp_path), enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback, *extra], log_every_n_steps=1, default_root_dir=tmp_path,
        **options,
    )  # fmt: skip
    module = Tiny()
    trainer.fit(module, loader(data_size), ckpt_path=ckpt_path)
    return trainer, module


PRUNE = dict(sparsity=0.5, schedule=pk.Gradual(0, 8, every=2))


def test_one_pruner_step_per_optimizer_step_under_gradient_accumulation(tmp_path):
    callback = PruningCallback(**PRUNE)
    trainer, module = fit(callback, tmp_path, max_steps=8, accumulate_grad_batches=2)
    assert module.optimizer_steps == trainer.global_step == callback.pruner.step_count == 8
    assert callback.pruner.sparsity == pytest.approx(0.5, abs=0.01)
    assert callback.pruner.enforcer.optimizers == [trainer.optimizers[0]]
    for name, keep in callback.pruner.masks.items():
        assert not module.get_parameter(name)[~keep].any()
    assert trainer.logged_metrics["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_attach_optimizer_takes_lightnings_wrapper():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = nn.Linear(8, 4)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = pk.prune(model, 0.5, optimizer=LightningOptimizer(inner))
    assert pruner.enforcer.optimizers == [inner]


def test_resuming_from_a_checkpoint_continues_exactly(tmp_path):
    """8 steps in one run equal 4 steps, a checkpoint, and 4 more steps in a fresh Trainer, module and
    callback. Every batch is the same one: Lightning itself replays batches in another order when it
    resumes a plain DataLoader, which would change the weights whatever the pruner does."""
    options = dict(PRUNE, criterion="movement")
    first = PruningCallback(**options)
    _, whole = fit(first, tmp_path / "a", max_steps=8, data_size=4)
    half_trainer, _ = fit(PruningCallback(**options), tmp_path / "b", max_steps=4, data_size=4)
    half_trainer.save_checkpoint(tmp_path / "half.ckpt")
    assert torch.load(tmp_path / "half.ckpt", weights_only=False)["callbacks"]["prunekit_pruner"]["step"] == 4
    resumed_callback = PruningCallback(**options)
    _, resumed = fit(resumed_callback, tmp_path / "c", 8, ckpt_path=tmp_path / "half.ckpt", data_size=4)
    assert resumed_callback.pruner.step_count == first.pruner.step_count == 8
    for name, keep in first.pruner.masks.items():
        assert torch.equal(keep, resumed_callback.pruner.masks[name]), name
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_recipe_builds_the_pruner(tmp_path):
    callback = PruningCallback(recipe={"sparsity": 0.75, "schedule": {"one_shot": {"at": 0}}})
    fit(callback, tmp_path, max_steps=2)
    assert callback.pruner.sparsity == pytest.approx(0.75, abs=0.01)


@pytest.mark.slow  # a new interpreter importing torch
def test_import_prunekit_imports_no_training_framework():
    import subprocess
    import sys

    code = "import sys, prunekit; print([m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
