"""Hugging Face models after compaction: config fields, save_pretrained / from_pretrained round trips
(plain transformers where the config can describe the model, pk.from_pretrained always), and pk.summary
MACs of GPT-2's Conv1D layers and of attention, counted by hand on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.summary import ATTENTION_KIND

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
INPUTS = {"input_ids": IDS}


def llama(layers: int = 2) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def prune_and_compact(model: nn.Module, inputs=INPUTS, **options) -> nn.Module:
    pk.prune(model, 0.5, criterion="l2", granularity="out_channel", example_inputs=inputs, **options)
    return pk.compact(model, inputs)


def assert_same_outputs(a: nn.Module, b: nn.Module, inputs=INPUTS) -> None:
    with torch.no_grad():
        expected, actual = a(**inputs)[0], b(**inputs)[0]
    assert actual.shape == expected.shape
    assert float((expected - actual).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_uniform_llama_config_describes_the_compacted_model_and_plain_from_pretrained_loads_it(tmp_path):
    small = prune_and_compact(llama(), scope="local")  # every layer: 2 of 4 heads, 1 of 2 kv heads, 32 of 64
    config = small.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    assert config.intermediate_size == 32 and config.hidden_size == 32
    attention = small.model.layers[0].self_attn
    assert attention.q_proj.out_features == 16 and attention.num_key_value_groups == 2
    entry = config.prunekit
    assert entry["config_describes_model"] is True
    assert entry["original"] == {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}
    assert entry["layers"]["attention_heads"] == {"model.layers.0.self_attn": 2, "model.layers.1.self_attn": 2}
    assert pk.hf.decode_plan(entry["plan"]) == small.prunekit_plan

    small.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.num_attention_heads == 2 and loaded.config.prunekit["original"] == entry["original"]
    assert_same_outputs(small, loaded)
    assert_same_outputs(small, pk.from_pretrained(transformers.LlamaForCausalLM, tmp_path))


def test_uniform_bert_mlp_round_trips_with_plain_from_pretrained(tmp_path):
    small = prune_and_compact(bert(), scope="local", exclude=[r".*attention.*"])
    assert small.config.intermediate_size == 32 and small.config.num_attention_heads == 4
    assert small.config.prunekit["config_describes_model"] is True
    small.save_pretrained(tmp_path)
    assert_same_outputs(small, transformers.BertModel.from_pretrained(tmp_path))


def test_vit_and_t5_configs_get_head_counts_and_head_size(tmp_path):
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64,
        )
    ).eval()  # fmt: skip
    pixels = {"pixel_values": torch.randn(1, 3, 16, 16)}
    small = prune_and_compact(vit, pixels, scope="local")
    # ViT derives the head size from hidden_size / num_attention_heads unless the config has head_dim.
    assert (small.config.num_attention_heads, small.config.head_dim, small.config.intermediate_size) == (2, 8, 32)
    assert small.config.prunekit["added"] == ["head_dim"]
    small.save_pretrained(tmp_path / "vit")
    assert_same_outputs(small, transformers.ViTModel.from_pretrained(tmp_path / "vit"), pixels)

    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    ).eval()
    inputs = {"input_ids": IDS, "decoder_input_ids": IDS}
    small = prune_and_compact(t5, inputs, scope="local")
    assert (small.config.num_heads, small.config.d_kv, small.config.d_ff) == (2, 8, 32)
    assert small.encoder.block[0].layer[0].SelfAttention.inner_dim == 16
    small.save_pretrained(tmp_path / "t5")
    assert_same_outputs(small, transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5"), inputs)


def test_layers_of_different_sizes_need_pk_from_pretrained(tmp_path):
    # Layer 0 keeps its MLP whole, layer 1 loses half: no single intermediate_size describes that.
    small = prune_and_compact(llama(), scope="local", layer_sparsity={r"model\.layers\.0\.mlp\..*": 0.0})
    assert small.model.layers[0].mlp.up_proj.out_features == 64
    assert small.model.layers[1].mlp.up_proj.out_features == 32
    entry = small.config.prunekit
    assert entry["config_describes_model"] is False
    assert set(entry["layers"]["mlp_width"].values()) == {64, 32}
    # The config keeps the original sizes, which pk.from_pretrained rebuilds before applying the plan.
    assert (small.config.num_attention_heads, small.config.intermediate_size) == (4, 64)
    small.save_pretrained(tmp_path)

    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers refuses the shapes
        transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    loaded = pk.from_pretrained(transformers.LlamaForCausalLM, tmp_path)
    assert type(loaded) is transformers.LlamaForCausalLM and not loaded.training
    assert loaded.model.layers[1].mlp.up_proj.out_features == 32
    assert pk.hf.decode_plan(loaded.config.prunekit["plan"]) == small.prunekit_plan
    assert_same_outputs(small, loaded)
    # It can be saved and loaded again.
    loaded.save_pretrained(tmp_path / "again")
    assert_same_outputs(small, pk.from_pretrained(transformers.LlamaForCausalLM, tmp_path / "again"))


def test_bert_heads_cannot_be_described_by_its_config(tmp_path):
    small = prune_and_compact(bert(), scope="local")
    attention = small.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size) == (2, 16)
    # BERT's head size is hidden_size / num_attention_heads: 2 heads would mean heads of 16.
    assert small.config.prunekit["config_describes_model"] is False
    assert small.config.num_attention_heads == 4
    small.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.BertModel.from_pretrained(tmp_path)
    assert_same_outputs(small, pk.from_pretrained(transformers.BertModel, tmp_path))


def test_repeated_compaction_keeps_the_original_sizes_and_one_plan(tmp_path):
    once = prune_and_compact(llama(layers=1), scope="local")
    assert once.config.intermediate_size == 32
    loaded = transformers.LlamaForCausalLM.from_pretrained(_saved(once, tmp_path / "once"))
    twice = prune_and_compact(loaded, scope="local", exclude=[r".*self_attn.*"])
    assert twice.config.intermediate_size == 16 and twice.config.num_attention_heads == 2
    assert twice.config.prunekit["original"]["intermediate_size"] == 64
    assert len(twice.prunekit_plan["kept"]["model.layers.0.mlp.up_proj.weight"]["0"]) == 16
    rebuilt = pk.from_pretrained(transformers.LlamaForCausalLM, _saved(twice, tmp_path / "twice"))
    assert_same_outputs(twice, rebuilt)


def _saved(model: nn.Module, path) -> str:
    model.save_pretrained(path)
    return str(path)


def test_save_pruned_and_load_pruned_still_work_and_update_the_config(tmp_path):
    small = prune_and_compact(llama(layers=1), scope="local")
    pk.save_pruned(small, tmp_path / "small.safetensors")
    loaded = pk.load_pruned(llama(layers=1), tmp_path / "small.safetensors").eval()
    assert (loaded.config.num_attention_heads, loaded.config.intermediate_size) == (2, 32)
    assert_same_outputs(small, loaded)


def test_pk_from_pretrained_loads_an_uncompacted_checkpoint_and_refuses_non_model_classes(tmp_path):
    model = llama(layers=1)
    model.save_pretrained(tmp_path)
    assert_same_outputs(model, pk.from_pretrained(transformers.LlamaForCausalLM, tmp_path))
    with pytest.raises(TypeError, match="PreTrainedModel class"):
        pk.from_pretrained(nn.Linear, tmp_path)


def test_gpt2_attention_attributes_follow_removed_heads():
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GPT2Model(config).eval()
    # Remove head 1 (channels 8..15 of q, k and v in the fused c_attn; rows 8..15 of c_proj's (in, out) weight).
    kept_heads = [c for c in range(32) if not 8 <= c < 16]
    fused = [part * 32 + c for part in range(3) for c in kept_heads]
    plan = {
        "format": "prunekit-plan/1",
        "kept": {
            "h.0.attn.c_attn.weight": {"1": fused},
            "h.0.attn.c_attn.bias": {"0": fused},
            "h.0.attn.c_proj.weight": {"0": kept_heads},
        },
    }
    masked = transformers.GPT2Model(config).eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        masked.h[0].attn.c_proj.weight[8:16] = 0  # the head's output no longer reaches the residual stream
    pk.apply_plan(model, plan)
    attention = model.h[0].attn
    assert (attention.num_heads, attention.split_size, attention.head_dim) == (3, 24, 8)
    assert_same_outputs(masked, model)


# ---------------------------------------------------------------------------------------- summary MACs

B, L, E, H, V = 2, 5, 8, 2, 50  # batch, sequence, hidden size, heads, vocabulary


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_summary_counts_gpt2_conv1d_and_attention_macs(implementation):
    config = transformers.GPT2Config(
        vocab_size=V, n_embd=E, n_layer=1, n_head=H, n_positions=16, attn_implementation=implementation
    )
    model = transformers.GPT2LMHeadModel(config)
    s = pk.summary(model, {"input_ids": torch.randint(0, V, (B, L))})
    rows = {(row.name, row.kind): row for row in s.layers}
    tokens = B * L
    assert rows["transformer.h.0.attn.c_attn", "Conv1D"].macs == tokens * E * 3 * E  # weight (E, 3E)
    assert rows["transformer.h.0.attn.c_proj", "Conv1D"].macs == tokens * E * E
    assert rows["transformer.h.0.mlp.c_fc", "Conv1D"].macs == tokens * E * 4 * E
    assert rows["transformer.h.0.mlp.c_proj", "Conv1D"].macs == tokens * 4 * E * E
    # lm_head shares its weight with the token embedding: no parameters of its own, but it computes.
    lm_head = rows["lm_head", "Linear"]
    assert (lm_head.params, lm_head.macs) == (0, tokens * E * V)
    # Per head: L×L scores over the head size E/H, then L×L weights times values of E/H.
    attention = rows["transformer.h.0.attn", ATTENTION_KIND]
    assert attention.macs == attention.nonzero_macs == B * H * L * L * 2 * (E // H) == 800
    assert s.attention_macs == 800
    assert s.macs == tokens * (3 * E * E + E * E + 8 * E * E + E * V) + 800
    assert s.total_params == sum(p.numel() for p in model.parameters())


class SDPA(nn.Module):
    """Projections, then F.scaled_dot_product_attention on (B, heads, L, D) queries and (B, heads, S, D) keys."""

    def __init__(self, heads=3, head_dim=4):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q = nn.Linear(6, heads * head_dim)
        self.kv = nn.Linear(6, 2 * heads * head_dim)

    def forward(self, x, memory):
        q = self.q(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv(memory).unflatten(-1, (2, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


def test_summary_counts_scaled_dot_product_attention_by_its_formula():
    x, memory = torch.randn(2, 5, 6), torch.randn(2, 7, 6)  # B=2, L=5, S=7
    s = pk.summary(SDPA(heads=3, head_dim=4), (x, memory))
    assert s.attention_macs == 2 * 2 * 3 * 5 * 7 * 4  # 2·B·H·L·S·D
    assert [(row.name, row.kind) for row in s.layers] == [("q", "Linear"), ("kv", "Linear"), ("", ATTENTION_KIND)]
    assert s.macs == 2 * 5 * 6 * 12 + 2 * 7 * 6 * 24 + s.attention_macs


def test_summary_counts_activation_products_but_not_weight_products():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            projected = x @ self.weight  # a weight product: not attention
            transposed = x @ self.weight.t().t()  # a view of the weight: not attention either
            scores = torch.bmm(projected, projected.transpose(1, 2))  # (2, 5, 3) × (2, 3, 5)
            mixed = torch.einsum("bls,bsd->bld", scores, transposed)  # (2, 5, 5) × (2, 5, 3)
            return torch.baddbmm(mixed, scores, projected) + scores[0] @ projected[0]

    s = pk.summary(Mixed(), torch.randn(2, 5, 4))
    bmm = baddbmm = 2 * 5 * 5 * 3
    einsum = 2 * 5 * 5 * 3
    matmul = 5 * 3 * 5
    assert s.attention_macs == bmm + einsum + baddbmm + matmul
    assert [row.name for row in s.layers] == ["", ""]  # the root's weight row, then its attention row


def test_summary_counts_multihead_attention_scores():
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 5, 8)
    s = pk.summary(attention, (x, x, x))
    assert s.attention_macs == 2 * 3 * 5 * 5 * 8  # 2·B·L·S·E: the heads split E between them
    with torch.no_grad():
        s = pk.summary(attention, (x, x, x, None, False))  # need_weights=False: the sdpa path
    assert s.attention_macs == 2 * 3 * 5 * 5 * 8


def test_summary_counts_multihead_attention_projections_at_query_and_key_tokens():
    """Cross-attention of 4 queries over 6 keys (batch 2), E = 8, kdim = 3, vdim = 5: q rows at 8 query
    tokens, k and v rows at 12 key tokens, out_proj at 8 query tokens."""
    attention = nn.MultiheadAttention(8, 2, kdim=3, vdim=5, batch_first=True)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 6, 3), torch.randn(2, 6, 5)
    rows = {row.name: row for row in pk.summary(attention, (q, k, v)).layers if row.kind != ATTENTION_KIND}
    assert rows[""].macs == 8 * 8 * 8 + (8 * 3 + 8 * 5) * 12
    assert rows["out_proj"].macs == 8 * 8 * 8


def test_summary_counts_a_pruned_multihead_attention_at_its_kept_width():
    attention = nn.MultiheadAttention(8, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    inputs = (x, x, x, None, False)  # need_weights=False: weights averaged over heads would pin them
    dense = pk.summary(attention, inputs)
    pk.prune(attention, 0.5, granularity="out_channel", example_inputs=inputs, prune_outputs=True,
             prune_only="heads")  # fmt: skip
    small = pk.compact(attention, inputs, prune_outputs=True)
    assert small.num_heads == 2
    after = pk.summary(small, inputs)
    assert after.attention_macs == dense.attention_macs // 2
    assert after.macs - after.attention_macs == (dense.macs - dense.attention_macs) // 2


def gpt2(layers: int = 1) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=layers, n_head=4, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_layers_are_pruning_targets_with_their_columns_as_outputs():
    model = gpt2()
    pruner = pk.prune(model, 0.5, granularity="weight", scope="local")
    names = set(pruner.masks)
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"} <= names
    assert float((model.transformer.h[0].attn.c_attn.weight == 0).float().mean()) == 0.5
    # Conv1D stores its weight (in, out): an output unit is a column, and its bias entry goes with it.
    model = gpt2()
    pruner = pk.prune(model, 0.25, granularity="out_channel", coupled=False, include=["transformer.h.0.mlp.c_fc"])
    dead_columns = (model.transformer.h[0].mlp.c_fc.weight == 0).all(dim=0)
    assert int(dead_columns.sum()) == 32
    assert torch.equal(dead_columns, ~pruner.masks["transformer.h.0.mlp.c_fc.bias"])


def test_gpt2_heads_are_chosen_by_the_scores_of_their_projections():
    """Head 2 of the first block has tiny q, k, v columns (c_attn) and c_proj rows: it is the head
    removed there when each block loses one head of four."""
    model = gpt2(layers=2)
    attention = model.transformer.h[0].attn
    columns = [part * 32 + 2 * 8 + i for part in range(3) for i in range(8)]
    with torch.no_grad():
        attention.c_attn.weight[:, columns] *= 1e-3
        attention.c_proj.weight[16:24] *= 1e-3
    pk.prune(model, 0.25, granularity="out_channel", example_inputs=INPUTS, prune_only="heads")
    small = pk.compact(model, INPUTS)
    assert [block.attn.num_heads for block in small.transformer.h] == [3, 3]
    kept = small.prunekit_plan["kept"]["transformer.h.0.attn.c_proj.weight"]["0"]
    assert kept == [*range(0, 16), *range(24, 32)]
