"""Tracing the channel dependencies of a LLaMA-7B-shaped model on the meta device (no weight memory).

Builds ``transformers.LlamaForCausalLM`` with LLaMA-7B's shape (hidden 4096, 32 layers, 32 heads,
MLP 11008, vocabulary 32000; 6.7 B parameters) under ``torch.device("meta")``, so no weight memory is
allocated, and times ``pk.trace_dependencies`` on a batch of one sequence of ``--tokens`` tokens, with
torch on one thread and on every core (``torch.set_num_threads``), alternating, ``--rounds`` times
each (median reported): tracing must not get slower with more threads.

Run:  python benchmarks/trace_llama7b_meta.py        (needs transformers; ~1 minute)
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    parser.add_argument("--rounds", type=int, default=3)
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
    description = machine()  # with the caller's thread count
    counts = sorted({1, os.cpu_count() or 1})
    seconds: dict[int, list[float]] = {count: [] for count in counts}
    caller_threads = torch.get_num_threads()
    memory = None
    try:
        for _ in range(args.rounds):
            for count in counts:
                torch.set_num_threads(count)
                with PeakMemory() as probe:
                    start = time.perf_counter()
                    deps = pk.trace_dependencies(model, inputs, reuse=False)
                    seconds[count].append(time.perf_counter() - start)
                memory = probe if memory is None else memory
    finally:
        torch.set_num_threads(caller_threads)
    heads = sum(1 for name in deps.families if "self_attn" in name)
    rows = "\n".join(
        f"| {count} | {statistics.median(seconds[count]):.1f} s | {', '.join(f'{s:.1f}' for s in seconds[count])} |"
        for count in counts
    )
    text = f"""# Tracing a LLaMA-7B-shaped model on the meta device

Machine: {description}. Date: {today()}. Command: `python benchmarks/trace_llama7b_meta.py --tokens {args.tokens} --rounds {args.rounds}`.

| model | parameters | tokens traced | extra peak memory | removable units | families |
|---|---|---|---|---|---|
| LlamaForCausalLM, LLaMA-7B shape, meta device | {params / 1e9:.2f} B | {args.tokens} | {memory.extra / 2**20:.0f} MiB | {deps.num_units} | {len(deps.families)} ({heads} attention, {len(deps.families) - heads} MLP) |

Trace time by torch thread count (`torch.set_num_threads`, alternating, median of {args.rounds}):

| threads | trace time (median) | each run |
|---|---|---|
{rows}

Units: every layer's 32 heads (query, key, value and output-projection slices of one head) and 11008 MLP
neurons (gate, up and down slices); the hidden size is kept (RMSNorm normalises over it and it reaches
the output). The tracer's bookkeeping (its rules and the resolution of units) runs on one thread whatever
the caller's count; the model's own operations keep it.
"""
    path = write_result("trace_llama7b_meta", text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
