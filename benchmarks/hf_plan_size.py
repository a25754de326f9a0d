"""How large a compacted BERT-base's config.json is: the plan as plain kept-index lists (prunekit before
the bitmap encoding) against the encoding prunekit.hf writes now (each distinct list once, as a base64
bitmap). Random weights (no download): sizes depend on how many indices are kept, not on their values.

    python benchmarks/hf_plan_size.py
"""

from __future__ import annotations

import os
import tempfile

import torch
import transformers
from _common import machine, today, write_result

import prunekit as pk


def main() -> None:
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig()).eval()  # BERT-base: 12 layers, 768 wide, 3072 MLP
    inputs = {"input_ids": torch.randint(0, 30000, (1, 16))}
    pk.prune(model, 0.5, criterion="l2", granularity="out_channel", example_inputs=inputs)  # heads and neurons
    small = pk.compact(model, inputs, inplace=True)
    entry = small.config.prunekit
    with tempfile.TemporaryDirectory() as folder:
        small.config.save_pretrained(folder)
        encoded = os.path.getsize(os.path.join(folder, "config.json"))
        small.config.prunekit = dict(entry, plan=pk.hf.decode_plan(entry["plan"]))
        small.config.save_pretrained(folder)
        plain = os.path.getsize(os.path.join(folder, "config.json"))
    kept = sum(len(v) for dims in small.config.prunekit["plan"]["kept"].values() for v in dims.values())
    text = f"""# config.json of a compacted BERT-base

{today()}; {machine()}; torch {torch.__version__}, transformers {transformers.__version__}.
Command: `python benchmarks/hf_plan_size.py`. BERT-base (random weights) pruned to 50% of its heads
and feed-forward neurons in every layer (`granularity="out_channel"`, L2), compacted, config saved with
`save_pretrained` (indent 2, as transformers writes it). The plan keeps {kept} indices in all.

| plan in config.json | config.json bytes |
|---|---:|
| plain kept-index lists | {plain:,} |
| one base64 bitmap per distinct list (`prunekit-kept-bits/1`) | {encoded:,} |

{plain / encoded:.0f}x smaller.
"""
    print(text)
    write_result("hf_plan_size", text)


if __name__ == "__main__":
    main()
