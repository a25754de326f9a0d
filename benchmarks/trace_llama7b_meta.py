"""Tracing the channel dependencies of a LLaMA-7B-shaped model on the meta device (no weight memory).

Builds ``transformers.LlamaForCausalLM`` with LLaMA-7B's shape (hidden 4096, 32 layers, 32 heads,
MLP 11008, vocabulary 32000; 6.7 B parameters) under ``torch.device("meta")``, so no weight memory is
allocated, and times ``pk.trace_dependencies`` on a batch of one sequence of ``--tokens`` tokens.

Run:  python benchmarks/trace_llama7b_meta.py        (needs transformers; ~1 minute)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import PeakMemory, machine, today, write_result  # noqa: E402

import prunekit as pk  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    inputs = {"input_ids": torch.zeros(1, args.tokens, dtype=torch.long, device="meta")}
    with PeakMemory() as memory:
        start = time.perf_counter()
        deps = pk.trace_dependencies(model, inputs)
        seconds = time.perf_counter() - start
    heads = sum(1 for name in deps.families if "self_attn" in name)
    text = f"""# Tracing a LLaMA-7B-shaped model on the meta device

Machine: {machine()}. Date: {today()}. Command: `python benchmarks/trace_llama7b_meta.py --tokens {args.tokens}`.

| model | parameters | tokens traced | trace time | extra peak memory | removable units | families |
|---|---|---|---|---|---|---|
| LlamaForCausalLM, LLaMA-7B shape, meta device | {params / 1e9:.2f} B | {args.tokens} | {seconds:.1f} s | {memory.extra / 2**20:.0f} MiB | {deps.num_units} | {len(deps.families)} ({heads} attention, {len(deps.families) - heads} MLP) |

Units: every layer's 32 heads (query, key, value and output-projection slices of one head) and 11008 MLP
neurons (gate, up and down slices); the hidden size is kept (RMSNorm normalises over it and it reaches
the output). Times on this virtual machine vary by about ±10% from run to run.
"""
    path = write_result("trace_llama7b_meta", text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
