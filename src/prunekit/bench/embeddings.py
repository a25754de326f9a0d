"""Sentence embeddings of a Hugging Face encoder and how far pruning moves them (for one-shot studies).

An embedding is the mean of the last hidden states over a text's real tokens (padding masked out),
L2-normalised, as sentence-transformers' Pooling and Normalize modules compute it. The quality of a
pruned encoder is the mean cosine between its embeddings and the dense encoder's on held-out texts:
1 means unchanged. Needs ``transformers`` (the ``models`` extra).
"""

from __future__ import annotations

import torch
from torch import nn


def tokenized_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """``texts`` in order, ``batch_size`` at a time, padded and cut to ``max_length`` tokens."""
    return [
        tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        for i in range(0, len(texts), batch_size)
    ]


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(texts, hidden) normalised mean-pooled embeddings of every text of ``batches``."""
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out.append(nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def mean_cosine(model: nn.Module, batches: list[dict[str, torch.Tensor]], reference: torch.Tensor) -> float:
    """Mean cosine between ``model``'s embeddings of ``batches`` and ``reference`` (already normalised)."""
    return float((embed(model, batches) * reference).sum(-1).mean())
