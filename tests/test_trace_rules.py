"""The tracer's extension points: operation rules (tested on their own and registered by users), module
rules for layers whose forward computes its weight, and the thread count of the bookkeeping."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.structure import ChannelTracer, UnsupportedOperationError, register_module_rule, register_rule, rule
from prunekit.structure.labels import ids_of, zero_ok_of
from prunekit.structure.rules.elementwise import elementwise
from prunekit.structure.rules.layers import linear
from prunekit.structure.threads import one_thread


def _tracer_with_two_outputs():
    """A tracer on two Linear(4, 3) and an activation labelled with each one's output channels (ids 1-3
    for the first layer's rows, 4-6 for the second's, allocated in that order)."""
    model = nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})
    tracer = ChannelTracer(model)
    outputs = []
    for layer in (model["a"], model["b"]):
        ids = tracer.param_ids(layer.weight, 0, producer=True)
        out = torch.randn(2, 3)
        tracer.set_label(out, tracer.produce((2, 3), -1, ids))
        outputs.append(out)
    return tracer, outputs


def test_an_elementwise_rule_couples_channels_index_by_index():
    tracer, (a, b) = _tracer_with_two_outputs()
    out = a + b
    elementwise(tracer, torch.add, (a, b), {}, out)
    root = tracer.graph.components()
    assert root.tolist() == [0, 1, 2, 3, 1, 2, 3]  # id 4 joins 1, 5 joins 2, 6 joins 3
    label = tracer.label(out)
    assert ids_of(label)[0].tolist() == [3 + 1, 3 + 2, 3 + 3]  # any member of each pair names it
    assert bool(zero_ok_of(label).all())  # a + b is zero where both pruned channels are


def test_an_elementwise_rule_marks_results_that_are_not_zero_where_pruned():
    tracer, (a, _) = _tracer_with_two_outputs()
    scaled, shifted = a * 2.0, a + 1.0
    elementwise(tracer, torch.mul, (a, 2.0), {}, scaled)
    elementwise(tracer, torch.add, (a, 1.0), {}, shifted)
    assert bool(zero_ok_of(tracer.label(scaled)).all())
    assert not bool(zero_ok_of(tracer.label(shifted)).any())
    assert tracer.graph.components().tolist() == list(range(7))  # one operand: nothing coupled


def test_a_layer_rule_consumes_its_input_and_produces_its_rows():
    layer = nn.Linear(3, 5)
    model = nn.ModuleDict({"a": nn.Linear(4, 3), "c": layer})
    tracer = ChannelTracer(model)
    x = torch.randn(2, 3)
    tracer.set_label(x, tracer.produce((2, 3), -1, tracer.param_ids(model["a"].weight, 0, producer=True)))
    out = F.linear(x, layer.weight, layer.bias)
    linear(tracer, F.linear, (x, layer.weight, layer.bias), {}, out)
    root = tracer.graph.components()
    # a.weight rows: ids 1-3; c.weight columns: 4-6 (joined to them); c.weight rows: 7-11; c.bias: 12-16.
    assert root[4:7].tolist() == [1, 2, 3]
    assert root[12:17].tolist() == [7, 8, 9, 10, 11]
    assert ids_of(tracer.label(out))[0].tolist() == [7, 8, 9, 10, 11]


# ---------------------------------------------------------------------------- user rules for custom ops


@torch.library.custom_op("prunekit_test::channel_scale", mutates_args=())
def channel_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x · scale along the last dimension, as an opaque custom op (the tracer cannot see inside)."""
    return x * scale


@channel_scale.register_fake
def _(x, scale):
    return torch.empty_like(x)


class ScaledMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 8)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.down = nn.Linear(8, 3)

    def forward(self, x):
        return self.down(torch.ops.prunekit_test.channel_scale(torch.relu(self.up(x)), self.scale))


def _channel_scale_rule(tracer, func, args, kwargs, out):
    x, scale = args
    tracer.join_param(scale, 0, ids_of(tracer.full_label(x)).reshape(-1, x.shape[-1])[0])
    tracer.set_label(out, tracer.label(x))  # a pruned channel (zero) stays zero


@pytest.mark.parametrize("key", ["prunekit_test::channel_scale", torch.ops.prunekit_test.channel_scale])
def test_a_user_rule_makes_a_custom_op_traceable(key):
    torch.manual_seed(0)
    model, x = ScaledMLP().eval(), torch.randn(4, 6)
    with pytest.raises(UnsupportedOperationError, match=r"prunekit_test::channel_scale.*register_rule"):
        pk.trace_dependencies(model, x, reuse=False)
    handle = register_rule(key, _channel_scale_rule)
    try:
        deps = pk.trace_dependencies(model, x, reuse=False)
        assert deps.num_units == 8
        assert set(deps.members(0)) == {"up.weight", "up.bias", "scale", "down.weight"}
        pk.prune(model, sparsity=0.5, granularity="out_channel", example_inputs=x)
        with torch.no_grad():
            masked = model(x)
        small = pk.compact(model, x)
        assert small.scale.shape == (4,) and small.up.out_features == 4
        torch.testing.assert_close(small(x), masked)
    finally:
        handle.remove()
    with pytest.raises(UnsupportedOperationError):  # removed: unsupported again
        pk.trace_dependencies(ScaledMLP(), x, reuse=False)


def test_a_user_rule_overrides_the_built_in_one_until_removed():
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4)
    assert pk.trace_dependencies(model, x, reuse=False).num_units == 8
    seen = []

    @rule("relu")
    def keep_everything(tracer, func, args, kwargs, out):
        seen.append(func)
        tracer.pin_tensors(args[0])
        tracer.set_label(out, None)

    try:
        assert pk.trace_dependencies(model, x, reuse=False).num_units == 0
        assert seen
    finally:
        register_rule("relu", elementwise)  # what prunekit registers for it
    assert pk.trace_dependencies(model, x, reuse=False).num_units == 8


def test_rules_are_registered_for_names_or_functions_only():
    with pytest.raises(TypeError, match="callable"):
        register_rule("add", "not a function")
    with pytest.raises(TypeError, match="operation names or functions"):
        register_rule([3], elementwise)
    with pytest.raises(TypeError, match="module class"):
        register_module_rule("Linear", lambda call: None)


def test_an_op_in_the_models_own_forward_gets_advice_it_can_follow():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)

        def forward(self, x):
            return torch.fft.rfft(self.fc(x)).real

    with pytest.raises(UnsupportedOperationError) as raised:
        pk.trace_dependencies(Root(), torch.randn(2, 4))
    message = str(raised.value)
    assert "model's own forward" in message and "register_rule('fft_rfft'" in message
    assert "submodule" in message and 'exclude=["<the model\'s own forward>"]' not in message


# ---------------------------------------------------------------------------- module rules


class QuantLinear(nn.Module):
    """A Linear stored as int8 rows with one float scale per row: its forward dequantizes, so the weight
    F.linear sees is computed, not a parameter."""

    def __init__(self, in_features, out_features, int8_parameter=False):
        super().__init__()
        weight = torch.randn(out_features, in_features)
        scale = weight.abs().amax(dim=1) / 127
        quantized = torch.round(weight / scale[:, None]).to(torch.int8)
        if int8_parameter:
            self.weight_int8 = nn.Parameter(quantized, requires_grad=False)
        else:
            self.register_buffer("weight_int8", quantized)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(torch.randn(out_features))
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x):
        return F.linear(x, self.weight_int8.float() * self.scale[:, None], self.bias)


def trace_quant_linear(call):
    call.consume(call.input(), -1, "weight_int8", 1)
    call.produce(call.output, -1, "weight_int8", 0, shared=("scale", "bias"))


def update_quant_linear(module):
    module.out_features, module.in_features = module.weight_int8.shape


def _quant_mlp(int8_parameter):
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.ReLU(), QuantLinear(16, 12, int8_parameter), nn.ReLU(), nn.Linear(12, 4)]
    return nn.Sequential(*layers).eval()


def test_without_a_module_rule_a_computed_weight_keeps_its_channels():
    model, x = _quant_mlp(False), torch.randn(5, 8)
    deps = pk.trace_dependencies(model, x, reuse=False)
    assert deps.num_units == 0  # the dequantized weight is opaque: both its sides stay


@pytest.mark.parametrize("int8_parameter", [False, True], ids=["int8 buffer", "int8 frozen parameter"])
def test_a_module_rule_makes_a_quantized_linear_prunable_and_compactable(int8_parameter):
    handle = register_module_rule(QuantLinear, trace_quant_linear, update_shapes=update_quant_linear)
    try:
        model, x = _quant_mlp(int8_parameter), torch.randn(5, 8)
        deps = pk.trace_dependencies(model, x, reuse=False)
        assert deps.num_units == 16 + 12
        names = {piece.full_name for piece in deps.slices}
        assert {"2.weight_int8", "2.scale", "2.bias"} <= names
        pk.prune(model, sparsity=0.5, granularity="out_channel", example_inputs=x)
        with torch.no_grad():
            masked = model(x)
        small = pk.compact(model, x)
        quant = small[2]
        assert quant.weight_int8.dtype == torch.int8 and tuple(quant.weight_int8.shape) == (6, 8)
        assert tuple(quant.scale.shape) == (6,) and (quant.in_features, quant.out_features) == (8, 6)
        assert isinstance(quant.weight_int8, nn.Parameter) == int8_parameter
        with torch.no_grad():
            torch.testing.assert_close(small(x), masked)
    finally:
        handle.remove()


def test_a_module_rule_naming_a_missing_tensor_is_refused_with_its_name():
    def wrong(call):
        call.consume(call.input(), -1, "weight", 1)

    handle = register_module_rule(QuantLinear, wrong)
    try:
        with pytest.raises(UnsupportedOperationError, match=r"QuantLinear.*'2'.*'weight'.*weight_int8"):
            pk.trace_dependencies(_quant_mlp(False), torch.randn(5, 8), reuse=False)
    finally:
        handle.remove()


class LoRALinear(nn.Module):
    """base(x) + B(A(x)), with A: in → r and B: r → out (Hu et al., 2021, "LoRA")."""

    def __init__(self, in_features, out_features, r=4):
        super().__init__()
        self.base = nn.Linear(in_features, out_features)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        nn.init.normal_(self.lora_B.weight)  # non-zero, so a wrong slice shows in the outputs

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


def test_a_lora_wrapped_linear_traces_through_its_linears_and_compacts_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(8, 16), nn.ReLU(), LoRALinear(16, 4)).eval()
    x = torch.randn(5, 8)
    deps = pk.trace_dependencies(model, x, reuse=False)
    hidden = next(u for u in range(deps.num_units) if "0.base.weight" in deps.members(u))
    assert set(deps.members(hidden)) == {
        "0.base.weight", "0.base.bias", "0.lora_B.weight", "2.base.weight", "2.lora_A.weight",
    }  # fmt: skip
    reference = copy.deepcopy(model)
    pk.prune(model, sparsity=0.5, granularity="out_channel", example_inputs=x)
    with torch.no_grad():
        masked = model(x)
    small = pk.compact(model, x)
    assert small[0].base.out_features == 8 and small[2].base.in_features == 8
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked)
        assert not torch.allclose(masked, reference(x))  # something was really removed


# ---------------------------------------------------------------------------- threads


def test_bookkeeping_runs_on_one_thread_and_restores_the_count_even_on_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with one_thread():
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        seen = []

        @rule("relu")
        def count_threads(tracer, func, args, kwargs, out):
            seen.append(torch.get_num_threads())
            elementwise(tracer, func, args, kwargs, out)

        try:
            pk.trace_dependencies(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.randn(2, 4), reuse=False)
        finally:
            register_rule("relu", elementwise)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- head counts compaction cannot update


class FixedHeadCount(nn.Module):
    """Attention that reshapes by its stored ``num_heads`` but has no head-size attribute (as timm's LeViT):
    compaction cannot recount its heads, so removing one would break the reshape."""

    def __init__(self, dim=16, num_heads=4):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).permute(0, 2, 1, 3).split([self.key_dim] * 3, dim=-1)
        attention = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(b, n, -1))


def _fixed_heads_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), FixedHeadCount(), nn.Linear(16, 4)).eval()


def test_heads_stay_in_a_module_whose_head_count_compaction_cannot_update():
    model, x = _fixed_heads_model(), torch.randn(2, 5, 8)
    deps = pk.trace_dependencies(model, x, reuse=False)
    assert int(deps.unit_is_head.sum()) == 0
    pk.prune(model, sparsity=0.5, granularity="out_channel", example_inputs=x)
    with torch.no_grad():
        masked = model(x)
    small = pk.compact(model, x)
    assert small[1].qkv.out_features == 48 and small[0].out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked)


def test_a_compacted_model_that_fails_is_refused_naming_the_module_and_line(monkeypatch):
    import prunekit.structure.rules.movement as movement

    monkeypatch.setattr(movement, "head_count_is_fixed", lambda module: False)  # heads offered, as before
    model, x = _fixed_heads_model(), torch.randn(2, 5, 8)
    assert int(pk.trace_dependencies(model, x, reuse=False).unit_is_head.sum()) == 4
    pk.prune(model, sparsity=0.5, granularity="out_channel", example_inputs=x, prune_only="heads")
    with pytest.raises(pk.CompactionError, match=r"in module '1', at `q, k, v = self.qkv\(x\).view.*exclude=\['1'\]"):
        pk.compact(model, x)


@pytest.mark.slow
def test_levit_keeps_the_heads_of_its_attention_and_compacts():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x)  # fills LeViT's per-head attention-bias cache, so its biases no longer pin the heads
    pk.prune(model, sparsity=0.3, granularity="out_channel", scope="local", example_inputs=x)
    with torch.no_grad():
        masked = model(x)
    small = pk.compact(model, x)
    attention = small.stages[2].blocks[0].attn
    assert attention.num_heads == 8 and attention.qkv.linear.out_features == 512
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked, rtol=1e-4, atol=1e-4 * float(masked.abs().max()))
