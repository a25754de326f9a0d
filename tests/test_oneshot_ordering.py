"""The published ordering on a causal LM trained here (byte-level GPT-2 on the standard library's sources):
SparseGPT ≤ Wanda < magnitude in perplexity, at 50% unstructured and at 2:4 (Frantar & Alistarh 2023;
Sun et al. 2023). Deterministic: fixed files, seeds and windows."""

import copy

import pytest
import torch

import prunekit as pk

pytest.importorskip("transformers")


@pytest.mark.slow
def test_sparsegpt_and_wanda_beat_magnitude_on_a_trained_lm():
    from prunekit.bench.text_lm import TinyLMConfig, byte_tokens, calibration_windows, stdlib_files, train_tiny_lm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = byte_tokens(stdlib_files(0, 60))
        held_out = byte_tokens(stdlib_files(100, 10), 64 * 64)
        model = train_tiny_lm(train, TinyLMConfig(layers=2, width=64, context=64, batch=16, steps=800))
        calibration = calibration_windows(train, 32, 64, 16)
        dense = pk.perplexity(model, held_out, window=64)
        for granularity in (dict(sparsity=0.5), dict(granularity=pk.NM(2, 4))):
            ppl = {}
            for criterion in ("magnitude", "wanda", "sparsegpt"):
                pruned = copy.deepcopy(model)
                if criterion == "magnitude":
                    pk.prune(pruned, criterion="magnitude", include=[r"transformer\.h\..*"], **granularity)
                else:
                    pk.prune(pruned, criterion=criterion, calibration=calibration, progress=False, **granularity)
                ppl[criterion] = pk.perplexity(pruned, held_out, window=64)
            assert dense < ppl["sparsegpt"] <= ppl["wanda"] < ppl["magnitude"], (granularity, dense, ppl)
    finally:
        torch.set_num_threads(threads)
