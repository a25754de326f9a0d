"""prunekit.integrations.transformers.PruningCallback with the real transformers.Trainer on a tiny GPT-2
built from a config (random weights, CPU, a few steps)."""

import shutil

import pytest
import torch

import prunekit as pk

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from prunekit.integrations.transformers import STATE_FILE, PruningCallback  # noqa: E402

ARGS = dict(
    per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, use_cpu=True,
    report_to="none", disable_tqdm=True, logging_steps=2, save_strategy="no", seed=0, data_seed=0,
)  # fmt: skip


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def dataset(size=16):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(64, (size, 8), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def train(tmp_path, callback, resume=None, **overrides):
    model = tiny_gpt2()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), **{**ARGS, **overrides})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


PRUNE = dict(sparsity=0.5, schedule=pk.Gradual(0, 8, every=2), exclude=["lm_head"])


def test_one_pruner_step_per_optimizer_step_under_gradient_accumulation(tmp_path):
    callback = PruningCallback(**PRUNE)
    trainer = train(tmp_path, callback, num_train_epochs=2)  # 16 samples, 2 per batch, 2 batches per step
    assert trainer.state.global_step == 8 and callback.pruner.step_count == 8
    assert callback.pruner.sparsity == pytest.approx(0.5, abs=0.01)
    # the attached optimizer is Accelerate's wrapper's inner optimizer; pruned weights stayed zero
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert callback.pruner.enforcer.optimizers == [trainer.optimizer.optimizer]
    for name, keep in callback.pruner.masks.items():
        assert not trainer.model.get_parameter(name)[~keep].any()
    logged = [entry["sparsity"] for entry in trainer.state.log_history if "sparsity" in entry]
    assert logged and logged[-1] == pytest.approx(0.5, abs=0.01) and logged[0] < logged[-1]


def test_resuming_from_a_checkpoint_continues_exactly(tmp_path):
    options = dict(PRUNE, criterion="movement")
    first = PruningCallback(**options)
    whole = train(tmp_path / "a", first, max_steps=8, save_strategy="steps", save_steps=4)
    assert (tmp_path / "a" / "checkpoint-4" / STATE_FILE).is_file()
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    callback = PruningCallback(**options)
    resumed = train(tmp_path / "b", callback, resume=True, max_steps=8, save_strategy="steps", save_steps=4)
    assert callback.pruner.step_count == 8
    full_masks = first.pruner.masks
    assert full_masks.keys() == callback.pruner.masks.keys()
    for name, keep in full_masks.items():
        assert torch.equal(keep, callback.pruner.masks[name]), name
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_resuming_without_the_pruner_state_is_refused(tmp_path):
    train(tmp_path / "a", PruningCallback(**PRUNE), max_steps=4, save_strategy="steps", save_steps=4)
    (tmp_path / "a" / "checkpoint-4" / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="holds no pruner state"):
        train(tmp_path / "a", PruningCallback(**PRUNE), resume=str(tmp_path / "a" / "checkpoint-4"), max_steps=8)


def test_a_recipe_builds_the_pruner_and_overrides_replace_its_values(tmp_path):
    recipe = "sparsity: 0.9\nschedule: {gradual: {start: 0, end: 4, every: 2}}\nexclude: [lm_head]\n"
    callback = PruningCallback(recipe=recipe, sparsity=0.25)
    train(tmp_path, callback, max_steps=4)
    assert callback.pruner.sparsity == pytest.approx(0.25, abs=0.01)


def test_bad_arguments_fail_before_training():
    with pytest.raises(TypeError, match="say how to prune"):
        PruningCallback()
    with pytest.raises(ValueError, match="unknown key"):
        PruningCallback(recipe={"sparsty": 0.5})
    with pytest.raises(TypeError, match="not both"):
        PruningCallback(pruner=pk.Pruner(tiny_gpt2(), 0.5), sparsity=0.5)


def test_attach_optimizer_takes_accelerates_wrapper():
    from accelerate import Accelerator

    model = tiny_gpt2()
    optimizer = Accelerator(cpu=True).prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    pruner = pk.prune(model, 0.5, optimizer=optimizer)
    loss = model(input_ids=torch.arange(8)[None], labels=torch.arange(8)[None]).loss
    loss.backward()
    optimizer.step()
    for name, keep in pruner.masks.items():
        assert not model.get_parameter(name)[~keep].any()
