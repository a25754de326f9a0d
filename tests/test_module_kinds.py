"""Issue 10, "nothing silently ignored": one test per kind of module and parameter a user may hand
over, each decided deliberately (see :mod:`prunekit.checks`): honoured, or refused with an error that
names the layer and what to do, leaving the model bit for bit as it was."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as torch_prune
from model_state import IMAGES, X, expect_refusal, make_convnet, make_mlp, outputs
from torch import nn

import prunekit as pk

# ---------------------------------------------------------------------------- kinds of module and parameter


def _parametrized(model):
    parametrize.register_parametrization(model[2], "weight", nn.Identity())
    return model


REPARAMETRIZED = {
    "parametrize": (_parametrized, "2", "remove_parametrizations"),
    "weight_norm": (lambda m: (nn.utils.parametrizations.weight_norm(m[0]), m)[1], "0", "remove_parametrizations"),
    "spectral_norm": (lambda m: (nn.utils.parametrizations.spectral_norm(m[4]), m)[1], "4", "remove_parametrizations"),
    "legacy_spectral_norm": (lambda m: (nn.utils.spectral_norm(m[0]), m)[1], "0", "remove_spectral_norm"),
    "torch_prune": (lambda m: (torch_prune.l1_unstructured(m[2], "weight", 0.3), m)[1], "2", r"prune.remove"),
}


@pytest.mark.parametrize("kind", sorted(REPARAMETRIZED))
def test_reparametrized_weights_are_refused_naming_the_layer_and_the_fix(kind):
    make, layer, fix = REPARAMETRIZED[kind]
    model = make(make_mlp())
    expect_refusal(model, lambda: pk.prune(model, 0.5), ValueError, rf"layer '{layer}'.*{fix}")


def test_legacy_weight_norm_is_refused():
    model = make_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates it in favour of parametrizations
        nn.utils.weight_norm(model[2])
    expect_refusal(model, lambda: pk.prune(model, 0.5), ValueError, r"layer '2'.*remove_weight_norm")


def test_reparametrized_layer_left_out_by_include_is_fine():
    model = _parametrized(make_mlp())
    pruner = pk.prune(model, 0.5, include=["0", "4"])
    assert {t.name for t in pruner.targets} == {"0", "4"}


def test_quantized_layers_are_refused():
    model = torch.ao.quantization.quantize_dynamic(make_mlp(), {nn.Linear}, dtype=torch.qint8)
    expect_refusal(model, lambda: pk.prune(model, 0.5), ValueError, r"layer '0'.*quantized.*Prune the float model")


def test_fake_quant_layers_are_honoured():
    model = make_mlp()
    model.train()
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ao.quantization.prepare_qat(model, inplace=True)
        model(X)  # observers see the weights
        pruner = pk.prune(model, 0.5)
        model(X)
    for target in pruner.targets:
        layer = target.module
        keep = pruner.masks[target.full_name]
        assert int((~keep).sum()) == keep.numel() // 2
        assert bool((layer.weight_fake_quant(layer.weight)[~keep] == 0).all())  # zero survives fake-quant


@pytest.mark.slow  # imports dynamo
def test_compiled_models_are_refused():
    model = torch.compile(make_mlp())
    expect_refusal(model, lambda: pk.prune(model, 0.5), TypeError, r"torch\.compile.*model\._orig_mod")


def test_a_data_parallel_model_is_pruned_inside_and_compaction_refuses_the_wrapper():
    inner = make_mlp()
    model = nn.DataParallel(inner)
    pruner = pk.prune(model, 0.5)  # the layers of model.module, named without the "module." prefix
    assert pruner.model is inner and all(not t.name.startswith("module.") for t in pruner.targets)
    with pytest.raises(TypeError, match=r"DataParallel.*model\.module"):
        pk.compact(model, torch.randn(2, 8))


def test_tied_weights_stay_tied_and_count_once():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = model[0].weight
    pruner = pk.prune(model, 0.5)
    assert len(pruner.targets) == 1 and model[2].weight is model[0].weight
    assert int((model[0].weight == 0).sum()) == 32
    pruner.remove()
    assert model[2].weight is model[0].weight


def test_frozen_weights_are_pruned_and_stay_frozen():
    model = make_convnet()
    model[0].requires_grad_(False)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=IMAGES)
    small = pk.compact(model, IMAGES)
    assert not small[0].weight.requires_grad and not small[0].bias.requires_grad
    assert small[3].weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_prunes_the_exact_count_and_keeps_the_dtype(dtype):
    model = make_mlp().to(dtype)
    pk.prune(model, 0.5)
    for layer in (model[0], model[2], model[4]):
        assert layer.weight.dtype == dtype
        assert int((layer.weight == 0).sum()) == layer.weight.numel() // 2


def test_bfloat16_coupled_pruning_compacts_exactly():
    model = make_mlp().to(torch.bfloat16)
    x = X.to(torch.bfloat16)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x)
    masked = outputs(model, x)
    small = pk.compact(model, x)
    assert small[0].weight.dtype == torch.bfloat16 and small[0].out_features == 8
    torch.testing.assert_close(outputs(small, x), masked, atol=2e-2, rtol=2e-2)


def test_channels_last_is_kept_through_pruning_and_compaction():
    model = make_convnet().to(memory_format=torch.channels_last)
    x = IMAGES.to(memory_format=torch.channels_last)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x)
    assert model[3].weight.is_contiguous(memory_format=torch.channels_last)
    masked = outputs(model, x)
    small = pk.compact(model, x)
    assert small[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert small[3].weight.shape == (4, 4, 3, 3)
    torch.testing.assert_close(outputs(small, x), masked)


def test_a_second_pruner_keeps_the_first_ones_masks_and_says_they_are_shared():
    model = make_mlp()
    first = pk.prune(model, 0.5)
    pruned_before = {name: ~keep for name, keep in first.masks.items()}
    with pytest.warns(UserWarning, match=r"already carry prunekit masks.*remove\(\) drops them for both"):
        second = pk.prune(model, 0.75)
    for name, pruned in pruned_before.items():
        assert not bool(second.masks[name][pruned].any())  # masks only grow
        assert int((~second.masks[name]).sum()) == round(0.75 * pruned.numel())


def test_pruners_on_disjoint_layers_do_not_warn():
    model = make_mlp()
    pk.prune(model, 0.5, include=["0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pk.prune(model, 0.5, include=["2", "4"])


def test_pruner_state_survives_torch_save_of_the_model():
    model = make_mlp()
    pk.prune(model, 0.5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert pk.masked_parameters(loaded).keys() == pk.masked_parameters(model).keys()
    copy.deepcopy(loaded)  # masks are plain buffers


def test_a_parametrized_module_that_is_not_pruned_is_fine():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    parametrize.register_parametrization(model[1], "weight", nn.Identity())
    pruner = pk.prune(model, 0.5)
    assert {t.name for t in pruner.targets} == {"0", "2"}


def test_compact_refuses_a_wrapped_model():
    model = nn.DataParallel(make_mlp())
    expect_refusal(model, lambda: pk.compact(model, X), TypeError, r"DataParallel.*model\.module")


def test_copy_module_tree_copies_as_deepcopy_does():
    import copy

    from torch.nn.utils import parametrize

    from prunekit.plans import copy_module_tree

    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a  # a shared submodule
            self.c = nn.Linear(4, 4)
            self.c.weight = self.a.weight  # a tied parameter
            self.p = nn.Linear(4, 4)
            parametrize.register_parametrization(self.p, "weight", Scale())  # copies by its own __deepcopy__
            self.sizes = [4, 4]  # a mutable attribute
            self.shape = (4, (4, 2))
            self.register_buffer("steps", torch.zeros(()))

        def forward(self, x):
            return self.p(self.c(self.b(x)))

    net = Net()
    net.a.register_forward_hook(lambda module, args, out: out)  # a hook travels with the copy
    copied = copy_module_tree(net, {})
    reference = copy.deepcopy(net)
    x = torch.randn(2, 4)
    assert torch.equal(copied(x), reference(x)) and torch.equal(copied(x), net(x))
    assert copied.b is copied.a and copied.c.weight is copied.a.weight and copied.a is not net.a
    assert copied.sizes == [4, 4] and copied.sizes is not net.sizes and copied.shape == net.shape
    assert len(copied.a._forward_hooks) == 1 and copied._forward_hooks is not net._forward_hooks
    assert copied.steps is not net.steps and parametrize.is_parametrized(copied.p, "weight")
    assert set(dict(copied.named_parameters())) == set(dict(reference.named_parameters()))
