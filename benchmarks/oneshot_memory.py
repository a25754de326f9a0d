"""Extra peak memory of SparseGPT on a ~1 B-parameter LLaMA-shaped model (random weights, bfloat16).

The model is TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 32 heads with 4 key/value heads, vocab 32000,
22 blocks unless ``--layers`` says fewer), built from a ``LlamaConfig`` directly in bfloat16 (no float32
copy is ever made). It is pruned to 50% with ``criterion="sparsegpt"`` on a short calibration set, and
the resident-set high-water mark of the pruning call is compared with the model's own size and with the
bound of issue 11: one block's weights and statistics plus the calibration activations (the bit-packed
masks the model keeps afterwards, one bit per weight, are listed separately).

Run:  python benchmarks/oneshot_memory.py [--layers 22] [--progress]
(writes results/oneshot_memory_<layers>layers.md; it measures memory, not time, so a shared or niced
CPU changes only how long it takes)
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import PeakMemory, machine, today, trim_memory, write_result  # noqa: E402

import prunekit as pk  # noqa: E402

SEQUENCES, LENGTH, BATCH = 8, 128, 4
GIB = 2**30


def build(layers: int):
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model, config


def bound_bytes(model, config) -> dict[str, int]:
    """The issue's bound, itemised: one block's weights, its float32 statistics (H = XᵀX per Linear),
    the float32 work of the largest layer (a weight copy, the damped H and two Cholesky factors), and
    the calibration activations (hidden states in and out, plus the block's widest intermediate)."""
    block = model.model.layers[0]
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    tokens = SEQUENCES * LENGTH
    largest = max(linears, key=lambda m: m.in_features)
    return {
        "one block's weights": sum(p.numel() * p.element_size() for p in block.parameters()),
        "its statistics (float32 XᵀX per Linear)": sum(4 * m.in_features**2 for m in linears),
        "SparseGPT work of its largest layer (float32)": 4 * (largest.weight.numel() + 3 * largest.in_features**2),
        "calibration activations": tokens * (2 * config.hidden_size * 2 + 4 * 2 * config.intermediate_size),
    }


def plot(model_bytes: int, extra: int, bound: dict, masks: int, path) -> None:
    """The model's size, the measured extra peak and the itemised bound, as bars (GiB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.barh(["model (bf16)"], [model_bytes / GIB], color="grey")
    ax.barh(["extra peak of pk.prune"], [extra / GIB], color="tab:blue")
    left = 0.0
    for name, value in [*bound.items(), ("bit-packed masks", masks)]:
        ax.barh(["bound (itemised)"], [value / GIB], left=left, label=name)
        left += value / GIB
    ax.set_xlabel("GiB")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Calibrated SparseGPT: extra peak memory beside the model and the bound")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--progress", action="store_true", help="show pk.prune's progress bar over blocks")
    args = parser.parse_args()
    model, config = build(args.layers)
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (SEQUENCES, LENGTH), generator=generator)
    calibration = [{"input_ids": b} for b in ids.split(BATCH)]
    trim_memory()
    start = time.perf_counter()
    with PeakMemory() as peak:
        pruner = pk.prune(model, sparsity=0.5, criterion="sparsegpt", calibration=calibration, progress=args.progress)
    seconds = time.perf_counter() - start
    masks = sum((m.numel() + 7) // 8 for m in pruner.masks.values())
    bound = bound_bytes(model, config)
    total_bound = sum(bound.values()) + masks
    libs = ", ".join(f"{n} {md.version(n)}" for n in ("torch", "transformers", "prunekit"))
    lines = [
        "# Extra peak memory of calibrated SparseGPT on a ~1 B LLaMA-shaped model (benchmarks/oneshot_memory.py)",
        "",
        f"{today()}; {machine()}. Libraries: {libs}.",
        f"Model: LlamaForCausalLM, random weights in bfloat16, {args.layers} blocks of TinyLlama-1.1B's shape "
        f"(hidden 2048, MLP 5632, 32 heads / 4 KV heads, vocab 32000): {params / 1e9:.3f} B parameters, "
        f"{model_bytes / GIB:.2f} GiB.",
        f"Calibration: {SEQUENCES} sequences of {LENGTH} random token ids (seed 0), batches of {BATCH}. "
        f"SparseGPT 50% unstructured over all {7 * args.layers} Linear layers of the blocks took {seconds:.0f} s.",
        "",
        f"![memory](oneshot_memory_{args.layers}layers.png)",
        "",
        "| | GiB |",
        "|---|---|",
        f"| model (bf16 parameters) | {model_bytes / GIB:.3f} |",
        f"| **extra peak resident memory of pk.prune** | **{peak.extra / GIB:.3f}** |",
        f"| bound: {' + '.join(bound)} + masks kept on the model (1 bit per weight) | {total_bound / GIB:.3f} |",
    ]
    lines += [f"| — {name} | {value / GIB:.3f} |" for name, value in bound.items()]
    lines += [
        f"| — bit-packed masks | {masks / GIB:.3f} |",
        "",
        f"Extra peak / model size: {peak.extra / model_bytes:.2f}; extra peak / bound: {peak.extra / total_bound:.2f}.",
        "The resident-set high-water mark is reset before the call (/proc/self/clear_refs), so the figure is the",
        "call's own peak above what was resident before it (model and calibration ids).",
        "",
    ]
    text = "\n".join(lines)
    written = write_result(f"oneshot_memory_{args.layers}layers", text)
    plot(model_bytes, peak.extra, bound, masks, written.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
