"""Shape-only tracing: output rules equal the real operations; a trace of shapes equals the real trace."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit.structure import forward, register_shape_rule
from prunekit.structure.ops import op_name
from prunekit.structure.shapes import SHAPE_RULES, ValuesNeeded, shape_call

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")


def meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def assert_rule_matches(func, *args, **kwargs):
    """The output rule's shape and dtype equal the real call's (skipped when the real call refuses)."""
    try:
        real = func(*args, **kwargs)
    except (RuntimeError, ValueError):
        assume(False)
    name = op_name(func)
    assert name in SHAPE_RULES, name
    rule_out = SHAPE_RULES[name](tuple(meta(a) for a in args), {k: meta(v) for k, v in kwargs.items()})
    if rule_out is NotImplemented:
        return
    assert rule_out.device.type == "meta"
    assert (tuple(rule_out.shape), rule_out.dtype) == (tuple(real.shape), real.dtype)


@settings(max_examples=60, deadline=None)
@given(
    spatial=st.integers(1, 3),
    batch=st.sampled_from([None, 1, 2]),
    channels=st.integers(1, 4),
    groups=st.sampled_from([1, 2]),
    size=st.integers(1, 9),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.one_of(st.integers(0, 2), st.sampled_from(["same", "valid"])),
    dilation=st.integers(1, 2),
)
def test_convolution_rule_matches(spatial, batch, channels, groups, size, kernel, stride, padding, dilation):
    assume(not (padding == "same" and stride > 1))
    x = torch.randn(*([batch] if batch else []), channels * groups, *([size] * spatial))
    weight = torch.randn(3 * groups, channels, *([kernel] * spatial))
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    assert_rule_matches(conv, x, weight, None, stride, padding, dilation, groups)


@settings(max_examples=80, deadline=None)
@given(
    spatial=st.integers(1, 3),
    size=st.integers(1, 11),
    kernel=st.integers(1, 4),
    stride=st.one_of(st.none(), st.integers(1, 3)),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    ceil_mode=st.booleans(),
    average=st.booleans(),
)
def test_pooling_rule_matches(spatial, size, kernel, stride, padding, dilation, ceil_mode, average):
    x = torch.randn(2, 3, *([size] * spatial))
    if average:
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial - 1]
        assert_rule_matches(pool, x, kernel, stride, padding, ceil_mode)
    else:
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
        assert_rule_matches(pool, x, kernel, stride, padding, dilation, ceil_mode)


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("size", [1, 3, (2, None, 1)])
def test_adaptive_pooling_rule_matches(spatial, size):
    x = torch.randn(2, 3, *([5] * spatial))
    size = size if isinstance(size, int) else size[:spatial]
    for pool in ((F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[spatial - 1],
                 (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[spatial - 1]):  # fmt: skip
        assert_rule_matches(pool, x, size)


shapes = st.lists(st.sampled_from([1, 3]), min_size=0, max_size=3)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64])


@settings(max_examples=80, deadline=None)
@given(
    a_shape=shapes,
    b_shape=shapes,
    a_dtype=dtypes,
    b_dtype=dtypes,
    scalar=st.sampled_from([None, 2, 0.5]),
    op=st.sampled_from([torch.add, torch.sub, torch.mul, torch.div, torch.rsub, torch.maximum, torch.pow]),
)
def test_binary_rule_matches(a_shape, b_shape, a_dtype, b_dtype, scalar, op):
    a = torch.ones(a_shape).to(a_dtype)
    b = torch.ones(b_shape).to(b_dtype) if scalar is None or op is torch.maximum else scalar
    assert_rule_matches(op, a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rules_of_layers_norms_and_reductions_match(dtype):
    x = torch.randn(2, 5, 8, dtype=dtype)
    assert_rule_matches(F.linear, x, torch.randn(6, 8, dtype=dtype), None)
    assert_rule_matches(F.layer_norm, x, (8,))
    assert_rule_matches(F.batch_norm, x, torch.zeros(5, dtype=dtype), torch.ones(5, dtype=dtype))
    assert_rule_matches(F.group_norm, x, 5)
    for unary in (F.relu, F.gelu, F.silu, torch.sigmoid, torch.tanh, torch.rsqrt, torch.exp):
        assert_rule_matches(unary, x)
    assert_rule_matches(F.softmax, x, -1)
    assert_rule_matches(torch.softmax, x, -1, torch.float32)  # a dtype: left to torch (NotImplemented)
    for dim, keepdim in ((-1, True), ((0, 2), False), (None, False), (1, False)):
        args = (x,) if dim is None else (x, dim, keepdim)
        assert_rule_matches(torch.mean, *args)
    assert_rule_matches(torch.cat, [x, x[:, :2]], 1)
    assert_rule_matches(torch.cat, [x, x], -1)
    q, k, v = (
        torch.randn(2, 4, 5, 8, dtype=dtype),
        torch.randn(2, 4, 7, 8, dtype=dtype),
        torch.randn(2, 4, 7, 3, dtype=dtype),
    )
    assert_rule_matches(F.scaled_dot_product_attention, q, k, v)
    assert_rule_matches(F.embedding, torch.randint(0, 10, (2, 5)), torch.randn(10, 4, dtype=dtype))


def test_in_place_calls_return_their_meta_target_and_refuse_a_real_one():
    x = torch.empty(2, 3, device="meta")
    assert shape_call(torch.Tensor.add_, "add", x, torch.ones(3)) is x
    assert shape_call(F.relu, "relu", x, inplace=True) is x
    with pytest.raises(ValuesNeeded):
        shape_call(torch.Tensor.add_, "add", torch.ones(2, 3), x)  # a meta value written into a real tensor
    with pytest.raises(ValuesNeeded):
        shape_call(torch.Tensor.add_, "add", x, torch.ones(4, 2, 3))  # would change the target's shape


def test_a_registered_shape_rule_is_used_and_removed():
    calls = []

    def rule(args, kwargs):
        calls.append(args)
        return torch.empty(args[0].shape, device="meta")

    handle = register_shape_rule("relu", rule)
    try:
        out = shape_call(F.relu, "relu", torch.empty(2, 3, device="meta"))
    finally:
        handle.remove()
    assert len(calls) == 1 and out.shape == (2, 3)
    assert SHAPE_RULES["relu"] is not rule


# ---------------------------------------------------------------- whole traces


def same_dependencies(a, b) -> bool:
    return (
        a.num_units == b.num_units
        and a.families == b.families
        and [(p.full_name, p.dim, p.producer, p.consumer) for p in a.slices]
        == [(p.full_name, p.dim, p.producer, p.consumer) for p in b.slices]
        and all(torch.equal(p.unit, q.unit) for p, q in zip(a.slices, b.slices))
        and torch.equal(a.unit_family, b.unit_family)
        and torch.equal(a.unit_is_head, b.unit_is_head)
        and torch.equal(a.unit_read_out, b.unit_read_out)
    )


def traced_both_ways(model, inputs, monkeypatch):
    """(trace as made by default, the same traced for real, whether the default one ran on shapes only)."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, output = forward.run_traced(model, inputs, [], False)
        default = pk.trace_dependencies(model, inputs, reuse=False)
        with monkeypatch.context() as patch:
            patch.setattr(forward, "shapes_only", lambda inputs: None)
            real = pk.trace_dependencies(model, inputs, reuse=False)
    return default, real, output is None


def vision(name):
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(**kwargs), torch.randn(1, 3, 64, 64)


def language(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    if kind == "vit":
        config = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=16, patch_size=4)  # fmt: skip
        return transformers.ViTModel(config), {"pixel_values": torch.randn(2, 3, 16, 16)}
    if kind == "t5":
        config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        return transformers.T5Model(config), {"input_ids": ids, "decoder_input_ids": ids}
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)
        return transformers.GPT2LMHeadModel(config), {"input_ids": ids, "attention_mask": mask}
    configs = {
        "bert": (transformers.BertConfig, transformers.BertModel, {}),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"num_key_value_heads": 2}),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"num_key_value_heads": 2}),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {"num_key_value_heads": 1, "head_dim": 8}),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"num_key_value_heads": 2, "pad_token_id": 0}),
    }
    config_class, model_class, extra = configs[kind]
    inputs = {"input_ids": ids, "attention_mask": mask} if kind in ("bert", "llama") else {"input_ids": ids}
    return model_class(config_class(**common, **extra)), inputs


#: Models whose forward runs on shapes alone (the rest read values, here the attention masks they build).
SHAPES_ONLY = {"resnet18", "mobilenet_v3_small", "densenet121", "googlenet", "shufflenet_v2_x0_5", "vit", "mistral",
               "gemma", "phi3"}  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "mobilenet_v3_small",
        "densenet121",
        "googlenet",
        "shufflenet_v2_x0_5",
        "vit",
        "mistral",
        "gemma",
        "phi3",
        "bert",
        "gpt2",
        "llama",
        "t5",
    ],  # fmt: skip
)
def test_the_default_trace_equals_the_real_one(name, monkeypatch):
    model, inputs = (
        language(name) if name in ("vit", "mistral", "gemma", "phi3", "bert", "gpt2", "llama", "t5") else vision(name)
    )
    default, real, shapes_only = traced_both_ways(model, inputs, monkeypatch)
    assert same_dependencies(default, real)
    assert default.num_units > 0
    assert shapes_only == (name in SHAPES_ONLY)


class BranchesOnValues(nn.Module):
    """Branches on a value of its input."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        h = torch.relu(self.a(x))
        if bool(x.sum() >= 0):  # a value of the input: plain data to the tracer, unreadable on meta
            h = h * 2
        return self.b(h)


def test_a_forward_that_reads_values_is_traced_for_real_and_left_unchanged(monkeypatch):
    model = BranchesOnValues().train()
    before = copy.deepcopy(model.state_dict())
    default, real, shapes_only = traced_both_ways(model.train(), torch.randn(5, 4), monkeypatch)
    assert not shapes_only and same_dependencies(default, real) and default.num_units == 8
    model.train()
    pk.trace_dependencies(model, torch.randn(5, 4), reuse=False)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
