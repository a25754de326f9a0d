"""Structured pruning and compaction across torchvision, timm and Hugging Face models (slow).

For every model: 50% of the removable channel groups are pruned (global L2), the model is compacted,
and the compacted model must run forward and backward, compute what the masked model computed, have
fewer parameters and MACs, and round-trip through save_pruned/load_pruned on a fresh instance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit as pk

pytestmark = pytest.mark.slow

# Every torchvision classification model runs, the largest too (vit_h_14: 633 M parameters, ~100 s and
# ~11 GiB peak on 2 cores; regnet_y_128gf: 645 M, ~70 s and ~12 GiB): the CI machine has 24 GiB.
TORCHVISION_224 = ("vit", "swin", "maxvit")


def _check_model(build, example_inputs, tmp_path, output_of=lambda out: out, tolerance=1e-5):
    torch.manual_seed(0)
    model = build().eval()
    dense_macs = pk.summary(model, example_inputs=example_inputs).macs
    pruner = pk.prune(
        model, 0.5, criterion="l2", granularity="out_channel", scope="global", example_inputs=example_inputs
    )
    assert pruner.dependencies.num_units > 0
    pruner.remove()
    small = pk.compact(model, example_inputs)  # raises if outputs differ by more than 1e-4 of their scale
    # Equal as mathematics says: compared in float64, where float32 rounding (and the denormals of
    # randomly initialised VGGs, whose outputs are ~1e-6) cannot blur a wrong channel.
    inputs64 = _widen(example_inputs)
    with torch.no_grad():
        masked = output_of(_call(copy.deepcopy(model).double(), inputs64))
        compacted = output_of(_call(copy.deepcopy(small).double(), inputs64))
    assert compacted.shape == masked.shape
    scale = float(masked.abs().max())
    assert float((masked - compacted).abs().max()) <= tolerance * scale
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    if dense_macs:  # pk.summary counts Linear/Conv/Conv1D and attention MACs; some models have none of them
        assert pk.summary(small, example_inputs=example_inputs).macs < dense_macs
    small.train()
    output_of(_call(small, example_inputs)).float().square().mean().backward()
    path = tmp_path / "small.pt"
    pk.save_pruned(small, path)
    loaded = pk.load_pruned(build(), path).eval()
    small.eval()
    with torch.no_grad():
        assert torch.equal(output_of(_call(loaded, example_inputs)), output_of(_call(small, example_inputs)))


def _widen(inputs):
    if isinstance(inputs, dict):
        return {k: _widen(v) for k, v in inputs.items()}
    return inputs.double() if inputs.is_floating_point() else inputs


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _torchvision_models():
    torchvision = pytest.importorskip("torchvision")
    return sorted(torchvision.models.list_models(module=torchvision.models))


try:
    import torchvision

    TORCHVISION_MODELS = sorted(torchvision.models.list_models(module=torchvision.models))
except ImportError:  # the matrix is skipped below
    TORCHVISION_MODELS = []


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_classification_model(name, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    options = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    size = 224 if name.startswith(TORCHVISION_224) else (299 if name == "inception_v3" else 64)
    _check_model(
        lambda: torchvision.models.get_model(name, weights=None, **options), torch.randn(1, 3, size, size), tmp_path
    )


TIMM_MODELS = [
    "resnet18",
    "resnet50d",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "convnext_atto",
    "regnetx_002",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "ghostnet_100",
    "densenet121",
    "mobilevit_xxs",
]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model(name, tmp_path):
    timm = pytest.importorskip("timm")
    size = timm.create_model(name, pretrained=False).default_cfg["input_size"]
    _check_model(lambda: timm.create_model(name, pretrained=False), torch.randn(1, *size), tmp_path)


class _MultiheadAttentionNet(nn.Module):
    """nn.MultiheadAttention between two Linear layers, with a padding mask and a causal mask."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, 32)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 5)

    def forward(self, x, padding):
        h = self.embed(x)
        length = h.shape[1] if self.batch_first else h.shape[0]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        h = h + self.attention(h, h, h, key_padding_mask=padding, attn_mask=causal, need_weights=False)[0]
        return self.down(torch.relu(self.up(h)))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_model(batch_first, tmp_path):
    x = torch.randn(2, 7, 6) if batch_first else torch.randn(7, 2, 6)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, -3:] = True
    _check_model(lambda: _MultiheadAttentionNet(batch_first), {"x": x, "padding": padding}, tmp_path)


def test_torchvision_small_vision_transformer(tmp_path):
    """vit_b_16's architecture (nn.MultiheadAttention in every block) at a size CI affords."""
    torchvision = pytest.importorskip("torchvision")
    _check_model(
        lambda: torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64
        ),
        torch.randn(2, 3, 32, 32),
        tmp_path,
    )


def _hf_models():
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 100, (2, 7))
    small = {"vocab_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    return {
        "bert": (lambda: transformers.BertModel(transformers.BertConfig(hidden_size=32, **small)), {"input_ids": ids}),
        "gpt2": (
            lambda: transformers.GPT2LMHeadModel(
                transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)
            ),
            {"input_ids": ids},
        ),
        "llama-gqa": (
            lambda: transformers.LlamaForCausalLM(
                transformers.LlamaConfig(hidden_size=32, num_key_value_heads=2, **small)
            ),
            {"input_ids": ids},
        ),
        "vit": (
            lambda: transformers.ViTModel(
                transformers.ViTConfig(
                    image_size=32, patch_size=8, hidden_size=32, **{k: v for k, v in small.items() if k != "vocab_size"}
                )
            ),
            {"pixel_values": torch.randn(1, 3, 32, 32)},
        ),
        "t5": (
            lambda: transformers.T5ForConditionalGeneration(
                transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
            ),
            {"input_ids": ids, "decoder_input_ids": ids},
        ),
    }


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama-gqa", "vit", "t5"])
def test_hugging_face_model(name, tmp_path):
    build, inputs = _hf_models()[name]
    _check_model(build, inputs, tmp_path, output_of=lambda out: out[0])


def test_llama_heads_are_removed_whole_with_shared_key_value_heads(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, 100, (1, 6))}
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=inputs, layer_sparsity={r".*mlp.*": 0.0})
    small = pk.compact(model, inputs)
    attention = small.model.layers[0].self_attn
    assert attention.q_proj.out_features == 16 and attention.k_proj.out_features == 8  # 2 of 4 heads, 1 of 2 kv
    assert attention.o_proj.in_features == 16


def test_torchvision_raft_optical_flow(tmp_path):
    """RAFT (which Torch-Pruning cannot prune): a correlation volume, a recurrent update block, and a
    list of flow predictions as outputs."""
    torchvision = pytest.importorskip("torchvision")
    images = (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128))
    torch.manual_seed(0)
    model = torchvision.models.optical_flow.raft_small(weights=None).eval()
    pruner = pk.prune(model, 0.5, criterion="l2", granularity="out_channel", example_inputs=images)
    assert pruner.dependencies.num_units > 0
    pruner.remove()
    small = pk.compact(model, images)  # checks every flow prediction against the masked model
    assert sum(p.numel() for p in small.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        flows = small(*images)
    assert len(flows) == 12 and flows[-1].shape == (1, 2, 128, 128)
