"""Sequential calibrated pruning of tiny Hugging Face models (random weights) and of any model via blocks=."""

import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.core.masks import masked_parameters
from prunekit.oneshot import CalibrationError, prune_with_calibration, wanda_keep
from prunekit.oneshot.calibration import capture_inputs

transformers = pytest.importorskip("transformers")

VOCAB = 96


def tiny(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        return transformers.GPT2LMHeadModel(config), "transformer.h"
    if kind == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.LlamaForCausalLM(config), "model.layers"
    config = transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB
    )
    return transformers.BertModel(config), "encoder.layer"


def calibration(batches=3, padded=True):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(batches):
        ids = torch.randint(1, VOCAB, (4, 12), generator=gen)
        mask = torch.ones(4, 12, dtype=torch.long)
        if padded:
            mask[1, 8:] = 0
            mask[3, 5:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert masked_parameters(model) == {}


def block_linears(model, path):
    return [
        (f"{path}.{i}.{n}", m)
        for i, block in enumerate(model.get_submodule(path))
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    ]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_every_block_layer_pruned_to_target_and_nothing_else(kind, criterion):
    model, path = tiny(kind)
    pruner = pk.prune(model, sparsity=0.5, criterion=criterion, calibration=calibration(), progress=False)
    masks = masked_parameters(model)
    names = [name for name, _ in block_linears(model, path)]
    assert sorted(masks) == sorted(f"{n}.weight" for n in names)
    for name, module in block_linears(model, path):
        assert masks[f"{name}.weight"].float().mean() == 0.5
        assert (module.weight[~masks[f"{name}.weight"]] == 0).all()
    assert pruner.sparsity == 0.5
    assert pruner.calibration_report.left_out  # the LM head / pooler stays dense, and says so


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_two_to_four_on_models(kind):
    model, path = tiny(kind)
    pk.prune(model, granularity=pk.NM(2, 4), criterion="sparsegpt", calibration=calibration(), progress=False)
    for name, module in block_linears(model, path):
        keep = masked_parameters(model)[f"{name}.weight"]
        keep = keep.t() if type(module).__name__ == "Conv1D" else keep
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()


def squared_input_norms(model, module, batches):
    """Σ X_j² over the real (unpadded) tokens at ``module``'s input, computed directly."""
    total = torch.zeros(module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.in_features)

    def hook(_, args, __):
        total.add_(args[0][mask.bool()].pow(2).sum(0))

    handle = module.register_forward_hook(hook)
    with torch.no_grad():
        for batch in batches:
            mask = batch["attention_mask"]
            model(**batch)
    handle.remove()
    return total


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_later_blocks_see_pruned_outputs_and_padding_is_ignored(kind):
    dense, path = tiny(kind)
    dense.eval()
    batches = calibration()
    model = copy.deepcopy(dense)
    pk.prune(model, sparsity=0.5, criterion="wanda", calibration=batches, progress=False, sequential=True)
    masks = masked_parameters(model)
    # Block 1's masks are Wanda's for its dense weights and the inputs produced by the *pruned* block 0.
    partly = copy.deepcopy(dense)
    partly.get_submodule(path)[0].load_state_dict(model.get_submodule(path)[0].state_dict())
    differs = False
    for name, module in block_linears(partly, path):
        if not name.startswith(f"{path}.1."):
            continue
        weight = module.weight.t() if type(module).__name__ == "Conv1D" else module.weight
        expected = wanda_keep(weight, squared_input_norms(partly, module, batches), 0.5)
        expected = expected.t() if type(module).__name__ == "Conv1D" else expected
        assert torch.equal(masks[f"{name}.weight"], expected)
        dense_module = dense.get_submodule(name)
        from_dense = wanda_keep(weight, squared_input_norms(dense, dense_module, batches), 0.5)
        from_dense = from_dense.t() if type(module).__name__ == "Conv1D" else from_dense
        differs |= not torch.equal(masks[f"{name}.weight"], from_dense)
    assert differs  # a non-sequential run (statistics of the dense model) would choose other masks


def test_block_inputs_keep_their_keyword_arguments():
    model, path = tiny("llama")
    captured = capture_inputs(model, model.get_submodule(path)[0], calibration(), None)
    kwargs = captured.kwargs[0]
    assert "position_embeddings" in kwargs and kwargs.get("attention_mask") is not None
    assert captured.masks[0].tolist()[1] == [True] * 8 + [False] * 4
    bert, path = tiny("bert")
    captured = capture_inputs(bert, bert.get_submodule(path)[0], calibration(), None)
    assert isinstance(captured.args[0][1], torch.Tensor)  # BERT passes its extended attention mask positionally
    assert not captured.args[0][1][3].all()  # and it masks the padding


def test_pruner_adopts_the_masks_step_keeps_them_and_remove_drops_them():
    model, path = tiny("llama")
    pruner = pk.prune(model, sparsity=0.5, criterion="sparsegpt", calibration=calibration(), progress=False)
    masks = {k: v.clone() for k, v in pruner.masks.items()}
    assert masks and masks.keys() == masked_parameters(model).keys()
    module = model.get_submodule(f"{path}.0.mlp.down_proj")
    with torch.no_grad():
        module.weight.add_(1.0)  # e.g. an optimizer step
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    pruner.step()
    assert all(torch.equal(masks[k], v) for k, v in pruner.masks.items())  # step() does not prune again
    assert (module.weight[~masks[f"{path}.0.mlp.down_proj.weight"]] == 0).all()
    kept = masks[f"{path}.0.mlp.down_proj.weight"]
    assert torch.equal(module.weight[kept], weights[f"{path}.0.mlp.down_proj.weight"][kept])
    pruner.remove()
    assert masked_parameters(model) == {}


def test_wanda_pruner_keeps_its_statistics_as_criterion():
    model, path = tiny("gpt2")
    pruner = pk.prune(model, sparsity=0.5, criterion="wanda", calibration=calibration(), progress=False)
    assert pruner.criterion.name == "wanda" and f"{path}.0.mlp.c_fc.weight" in pruner.criterion.stats


def test_owl_on_a_model_spreads_block_sparsities_with_exact_total():
    model, path = tiny("llama")
    report = pk.prune(
        model, sparsity=0.6, criterion="wanda", calibration=calibration(), layer_sparsity="owl", progress=False
    ).calibration_report
    per_block = {}
    for name, value in report.target_sparsity.items():
        per_block.setdefault(name.split(".")[2], set()).add(value)
    assert all(len(v) == 1 for v in per_block.values()) and len(per_block) == 3
    values = [v.pop() for v in per_block.values()]
    assert max(abs(v - 0.6) for v in values) == pytest.approx(0.08)
    assert sum(values) / 3 == pytest.approx(0.6)
    assert report.overall_sparsity == pytest.approx(0.6, abs=0.01)


def test_layer_sparsity_overrides_and_exclude_keep_their_meaning():
    model, path = tiny("llama")
    pk.prune(
        model,
        sparsity=0.5,
        criterion="wanda",
        calibration=calibration(),
        progress=False,
        layer_sparsity={r".*\.mlp\..*": 0.25, r".*\.o_proj": 0.0},
        exclude=[r".*\.2\..*"],
    )
    masks = masked_parameters(model)
    assert masks[f"{path}.0.mlp.up_proj.weight"].float().mean() == 0.75
    assert masks[f"{path}.0.self_attn.q_proj.weight"].float().mean() == 0.5
    assert f"{path}.0.self_attn.o_proj.weight" not in masks
    assert not any(k.startswith(f"{path}.2.") for k in masks)


class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x, scale=1.0):
        return x + self.down(torch.relu(self.up(x))) * scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.stages = nn.ModuleList([Stage(), Stage()])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x, scale=0.5)
        return self.head(x)


def test_any_model_through_blocks_and_its_keyword_arguments():
    torch.manual_seed(0)
    net = Net()
    batches = [torch.randn(16, 4) for _ in range(3)]
    seen = []
    net.stages[1].register_forward_pre_hook(lambda m, a, k: seen.append(k.get("scale")), with_kwargs=True)
    result = prune_with_calibration(
        net, 0.5, criterion="sparsegpt", calibration=iter(batches), blocks="stages", progress=False
    )
    assert set(seen) == {0.5} and result.left_out == ["stem", "head"]
    assert sorted(masked_parameters(net)) == [
        "stages.0.down.weight",
        "stages.0.up.weight",
        "stages.1.down.weight",
        "stages.1.up.weight",
    ]


def test_refused_calls_leave_the_model_untouched():
    model, path = tiny("gpt2")
    before = state(model)
    good = calibration()
    cases = [
        (dict(sparsity=0.5, criterion="wanda"), ValueError, "calibration= is missing"),
        (dict(sparsity=0.5, criterion="sparsegpt"), ValueError, "calibration= is missing"),
        (dict(sparsity=0.7, criterion="magnitude", layer_sparsity="owl"), ValueError, "calibration= is missing"),
        (
            dict(sparsity=0.5, criterion="wanda", calibration=good, scope="global"),
            ValueError,
            "scope='global' has no meaning",
        ),
        (
            dict(sparsity=0.5, criterion="wanda", calibration=good, blocks="transformer.nope"),
            ValueError,
            "no submodule",
        ),
        (dict(sparsity=0.5, criterion="wanda", calibration=good, layer_sparsity="owls"), ValueError, "'owl' or a dict"),
        (dict(sparsity=1.5, criterion="wanda", calibration=good), ValueError, "fraction"),
        (dict(granularity=pk.NM(2, 4), criterion="wanda", calibration=good, layer_sparsity="owl"), ValueError, "N:M"),
        (dict(sparsity=0.5, criterion="wanda", calibration=[]), CalibrationError, "empty"),
        (dict(sparsity=0.5, criterion="wanda", calibration=good[0]), CalibrationError, "wrap it in a list"),
        (
            dict(sparsity=0.5, criterion="wanda", calibration=good, include=["lm_head"]),
            ValueError,
            "outside the model's blocks",
        ),
        (
            dict(sparsity=0.5, criterion="wanda", calibration=good[:1] + [{"input_idz": good[0]["input_ids"]}]),
            CalibrationError,
            "batch 1 was rejected by the model: ValueError: You have to specify",
        ),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            pk.prune(model, **options)
        assert_untouched(model, before)
    with pytest.raises(ValueError, match="no meaning with criterion='magnitude'"):
        prune_with_calibration(model, 0.5, criterion="magnitude", calibration=good)
    assert_untouched(model, before)
    with pytest.raises(ValueError, match="name them with blocks="):
        pk.prune(
            nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
            sparsity=0.5,
            criterion="wanda",
            calibration=[torch.randn(2, 4)],
        )


def test_conv_layers_inside_blocks_are_refused_by_name():
    net = Net()
    net.stages[0].up = nn.Conv1d(8, 16, 1)
    before = state(net)
    with pytest.raises(ValueError, match=r"exclude=\['stages.0.up'\]"):
        pk.prune(net, sparsity=0.5, criterion="wanda", calibration=[torch.randn(2, 4)], blocks="stages")
    assert_untouched(net, before)


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_accelerate_offloaded_model_is_pruned_like_the_plain_one(where, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    plain, _ = tiny("llama")
    offloaded = copy.deepcopy(plain)
    if where == "cpu":
        accelerate.cpu_offload(offloaded, execution_device="cpu")
    else:
        accelerate.disk_offload(offloaded, str(tmp_path), execution_device="cpu")
    assert offloaded.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    batches = calibration()
    pk.prune(plain, sparsity=0.5, criterion="sparsegpt", calibration=batches, progress=False)
    pk.prune(offloaded, sparsity=0.5, criterion="sparsegpt", calibration=batches, progress=False)
    with torch.no_grad():
        ids = batches[0]["input_ids"]
        torch.testing.assert_close(offloaded(input_ids=ids).logits, plain(input_ids=ids).logits)


def _more(kind):
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 10))
    text = {"input_ids": ids, "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    if kind == "t5":
        config = transformers.T5Config(
            d_model=32,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            d_kv=8,
            vocab_size=VOCAB,
            decoder_start_token_id=0,
        )
        return transformers.T5ForConditionalGeneration(config), {**text, "decoder_input_ids": ids[:, :6]}
    if kind == "opt":
        config = transformers.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            word_embed_proj_dim=32,
            max_position_embeddings=32,
        )
        return transformers.OPTForCausalLM(config), text
    if kind == "vit":
        config = transformers.ViTConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
        )
        return transformers.ViTModel(config), {"pixel_values": torch.randn(2, 3, 16, 16)}
    model, _ = tiny(kind)
    return model, text


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "opt", "t5", "vit"])
def test_running_blocks_one_by_one_reproduces_the_model(kind):
    """Unpruned, the block-by-block run gives every stack's last block exactly what the model gives it,
    so the sequential pipeline passes every block its masks, positions and (T5) shared biases."""
    from prunekit.oneshot.blocks import find_blocks, next_inputs

    model, batch = _more(kind)
    model.eval()
    for _, stack in find_blocks(model):
        inputs = capture_inputs(model, stack[0], [batch], None)
        for block in stack[:-1]:
            inputs = next_inputs(block, inputs, None)
        real = []
        handle = stack[-1].register_forward_pre_hook(
            lambda m, a, k, real=real: real.append(a[0] if a else k["hidden_states"]), with_kwargs=True
        )
        with torch.no_grad():
            model(**batch)
        handle.remove()
        hidden = inputs.args[0][0] if inputs.args[0] else inputs.kwargs[0]["hidden_states"]
        torch.testing.assert_close(hidden, real[0])
    pk.prune(model, sparsity=0.5, criterion="sparsegpt", calibration=[batch], progress=False)
    assert masked_parameters(model)
