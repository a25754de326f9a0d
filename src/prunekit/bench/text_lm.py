"""A small GPT-2-style causal language model trained on local text, for the calibrated-pruning tests and
benchmarks (no downloads): the Python standard library's own source files, tokenized as bytes (vocab 256).

The corpus is deterministic: files are taken in sorted order from the running interpreter's standard
library, the training/calibration files and the evaluation files are disjoint, and their names are
returned so results can record exactly what was read. Needs ``transformers`` (the ``models`` extra).
"""

from __future__ import annotations

import ast
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(start: int, count: int) -> list[Path]:
    """``count`` top-level ``Lib/*.py`` files of this interpreter, in sorted order from index ``start``."""
    return sorted(STDLIB.glob("*.py"))[start : start + count]


def byte_tokens(files: list[Path], max_tokens: int | None = None) -> torch.Tensor:
    """The files' UTF-8 bytes concatenated (one token per byte, 0–255), cut to ``max_tokens``."""
    data = b"\n".join(path.read_bytes() for path in files)
    ids = torch.frombuffer(bytearray(data[:max_tokens] if max_tokens else data), dtype=torch.uint8)
    return ids.long()


def docstrings(files: list[Path], min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """The docstrings (module, class and function) of ``files``, whitespace collapsed, at least
    ``min_chars`` long and cut to ``max_chars``, in file order."""
    found = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text:
                    text = " ".join(text.split())
                    if len(text) >= min_chars:
                        found.append(text[:max_chars])
    return found


@dataclass
class TinyLMConfig:
    """Size and training of the byte-level GPT-2: widths in units, ``steps`` optimizer steps of
    ``batch`` windows of ``context`` tokens, AdamW at ``lr`` with linear warm-up and cosine decay."""

    layers: int = 4
    width: int = 128
    heads: int = 4
    context: int = 128
    steps: int = 300
    batch: int = 32
    lr: float = 3e-3
    seed: int = 0


def train_tiny_lm(tokens: torch.Tensor, config: TinyLMConfig | None = None):
    """Train a ``transformers.GPT2LMHeadModel`` on random windows of ``tokens``; returns it in eval mode."""
    import transformers

    config = TinyLMConfig() if config is None else config

    torch.manual_seed(config.seed)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=256,
            n_positions=config.context,
            n_embd=config.width,
            n_layer=config.layers,
            n_head=config.heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, config.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / config.steps)).item())
        ),
    )
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    for _ in range(config.steps):
        starts = torch.randint(0, tokens.numel() - config.context, (config.batch,), generator=generator)
        ids = torch.stack([tokens[s : s + config.context] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model.eval()


def calibration_windows(
    tokens: torch.Tensor, count: int, context: int, batch: int, seed: int = 0
) -> list[torch.Tensor]:
    """``count`` random windows of ``context`` tokens from ``tokens``, in batches of ``batch`` (tensors
    of shape (batch, context) the model takes as ``model(ids)``)."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - context, (count,), generator=generator).tolist()
    windows = torch.stack([tokens[s : s + context] for s in starts])
    return list(windows.split(batch))
