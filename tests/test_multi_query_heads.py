"""Query heads of multi-query attention (one key/value head, Gemma) as units of structured pruning, the
grouped-query units of LLaMA-style attention (one key/value head with its query heads), and the warning
for attention modules structured pruning leaves whole (Phi-3's fused qkv_proj). Tiny random-weight
configs: hidden 32, 2 blocks, 4 query heads of 8 channels."""

import warnings

import pytest
import torch

import prunekit as pk
from prunekit.core.masks import masked_parameters
from prunekit.structure import trace_dependencies

transformers = pytest.importorskip("transformers")

VOCAB = 64
COMMON = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=8, vocab_size=VOCAB,
    bos_token_id=0, eos_token_id=0, pad_token_id=0,
)  # fmt: skip


def tiny(kind, attn_implementation="sdpa"):
    torch.manual_seed(0)
    if kind == "gemma":
        config = transformers.GemmaConfig(**COMMON, num_key_value_heads=1)
        model = transformers.GemmaForCausalLM
    elif kind == "llama":
        config = transformers.LlamaConfig(**COMMON, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM
    elif kind == "mistral":
        config = transformers.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=4)
        model = transformers.MistralForCausalLM
    else:
        config = transformers.Phi3Config(**COMMON, num_key_value_heads=2)
        model = transformers.Phi3ForCausalLM
    config._attn_implementation = attn_implementation
    return model(config).eval()


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # a padding mask: the eager and mask-taking sdpa paths repeat the key/value head
    return {"input_ids": torch.randint(1, VOCAB, (2, 10), generator=gen), "attention_mask": mask}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def head_units(dependencies):
    return [dependencies.members(u) for u in range(len(dependencies)) if dependencies.unit_is_head[u]]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_multi_query_head_is_its_query_rows_and_output_columns(implementation):
    """One key/value head read by every query head: each query head is a unit (its 8 rows of q_proj,
    its 8 columns of o_proj), and k_proj / v_proj belong to no unit (they stay whole)."""
    model = tiny("gemma", implementation)
    units = head_units(trace_dependencies(model, batch()))
    assert len(units) == 2 * 4
    prefix = "model.layers.0.self_attn"
    first = units[0]
    assert first == {f"{prefix}.q_proj.weight": {0: list(range(8))}, f"{prefix}.o_proj.weight": {1: list(range(8))}}
    assert all(not any(".k_proj." in n or ".v_proj." in n for n in unit) for unit in units)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_gemma_loses_query_heads_exactly_and_its_config_describes_it(implementation):
    model = tiny("gemma", implementation)
    inputs, held_out = batch(1), batch(2)
    dense = {n: p.shape for n, p in model.named_parameters()}
    pk.prune(model, 0.25, granularity="out_channel", example_inputs=inputs)  # 1 head of 4, 16 of 64 neurons
    masks = masked_parameters(model)
    assert not any(".k_proj." in n or ".v_proj." in n for n in masks)
    assert masks["model.layers.0.self_attn.q_proj.weight"].all(dim=1).sum() == 24
    masked = logits(model, held_out)
    small = pk.compact(model, example_inputs=inputs)
    torch.testing.assert_close(logits(small, held_out), masked, atol=1e-5, rtol=1e-5)
    for layer in small.model.layers:
        attention = layer.self_attn
        assert attention.q_proj.weight.shape == (24, 32) and attention.o_proj.weight.shape == (32, 24)
        assert attention.k_proj.weight.shape == dense["model.layers.0.self_attn.k_proj.weight"] == (8, 32)
        assert attention.v_proj.weight.shape == (8, 32)
        assert attention.num_key_value_groups == 3  # repeat_kv repeats the one key/value head 3 times now
    config = small.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (3, 1, 8)
    assert config.intermediate_size == 48 and config.prunekit["config_describes_model"]
    rebuilt = type(small)(config).eval()
    rebuilt.load_state_dict(small.state_dict())  # strict: the config's sizes are the compacted model's
    torch.testing.assert_close(logits(rebuilt, held_out), masked, atol=1e-5, rtol=1e-5)


def test_a_query_head_goes_only_with_the_output_columns_that_read_it():
    """A pruned query head still attends (its scores are zero, so it averages the values): removing it
    is exact only once o_proj's columns that read it are zero too. Zero q rows alone: nothing goes."""
    model = tiny("gemma")
    inputs = batch()
    attention = model.model.layers[1].self_attn
    with torch.no_grad():
        attention.q_proj.weight[8:16] = 0  # head 1
    with pytest.warns(UserWarning, match="removed nothing"):
        small = pk.compact(model, example_inputs=inputs)
    assert small.model.layers[1].self_attn.q_proj.weight.shape == (32, 32)
    with torch.no_grad():
        attention.o_proj.weight[:, 8:16] = 0
    expected = logits(model, inputs)
    small = pk.compact(model, example_inputs=inputs)
    assert small.model.layers[1].self_attn.q_proj.weight.shape == (24, 32)
    assert small.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    torch.testing.assert_close(
        small.model.layers[1].self_attn.q_proj.weight, attention.q_proj.weight[[*range(8), *range(16, 32)]]
    )
    torch.testing.assert_close(logits(small, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_grouped_query_attention_loses_a_key_value_head_with_its_query_heads(kind):
    """Two key/value heads, two query heads each: a unit is one key/value head (8 rows of k_proj and of
    v_proj) with its two query heads (16 rows of q_proj, 16 columns of o_proj)."""
    model = tiny(kind)
    inputs, held_out = batch(1), batch(2)
    units = head_units(trace_dependencies(model, inputs))
    assert len(units) == 2 * 2
    prefix = "model.layers.0.self_attn"
    assert units[1] == {
        f"{prefix}.q_proj.weight": {0: list(range(16, 32))},
        f"{prefix}.k_proj.weight": {0: list(range(8, 16))},
        f"{prefix}.v_proj.weight": {0: list(range(8, 16))},
        f"{prefix}.o_proj.weight": {1: list(range(16, 32))},
    }
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=inputs)
    masked = logits(model, held_out)
    small = pk.compact(model, example_inputs=inputs)
    torch.testing.assert_close(logits(small, held_out), masked, atol=1e-5, rtol=1e-5)
    attention = small.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (16, 32) and attention.k_proj.weight.shape == (8, 32)
    assert attention.num_key_value_groups == 2
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
    type(small)(small.config).load_state_dict(small.state_dict())


def whole_attention_warnings(model, inputs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pk.prune(model, 0.3, granularity="out_channel", example_inputs=inputs)
    return [str(w.message) for w in caught if "removes no attention head" in str(w.message)]


def test_phi3_fused_qkv_leaves_attention_whole_and_says_so_once():
    model = tiny("phi3")
    found = whole_attention_warnings(model, batch())
    assert len(found) == 1
    assert "'model.layers.0.self_attn'" in found[0] and "'model.layers.1.self_attn'" in found[0]
    assert "qkv_proj" in found[0] and "2 attention module(s)" in found[0]
    assert not any(".self_attn." in name for name in masked_parameters(model))  # as the warning says


@pytest.mark.parametrize("kind", ["gemma", "llama", "mistral"])
def test_no_whole_attention_warning_where_heads_are_pruned(kind):
    model = tiny(kind)
    assert whole_attention_warnings(model, batch()) == []
    assert any(".self_attn.q_proj." in name for name in masked_parameters(model))


def test_no_whole_attention_warning_for_excluded_attention():
    model = tiny("phi3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pk.prune(model, 0.3, granularity="out_channel", example_inputs=batch(), exclude=[r".*\.self_attn"])
    assert not any("removes no attention head" in str(w.message) for w in caught)
