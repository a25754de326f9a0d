"""Row-wise selection: compare scores within each output row (one row = one output neuron's weights).

Wanda (Sun et al. 2023, §3) compares |W_ij|·‖X_j‖₂ among the weights of the same output i, not across
the whole layer: every output keeps the same number of inputs. The function below is that comparison
for any scores, so it can serve as a ``scope="row"`` for every criterion.
"""

from __future__ import annotations

import torch


def keep_per_row(scores: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Keep-mask (bool, ``scores``' shape (rows, cols)) pruning the ``num_pruned`` lowest scores of every row.

    Ties are broken by position, the earlier column pruned first (stable sort), so the result is
    deterministic.
    """
    if scores.dim() != 2:
        raise ValueError(f"keep_per_row takes a (rows, cols) tensor, got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    if not 0 <= num_pruned <= cols:
        raise ValueError(f"num_pruned must be in [0, {cols}] (the row length), got {num_pruned}")
    keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    if num_pruned:
        order = torch.sort(scores, dim=1, stable=True).indices
        keep.scatter_(1, order[:, :num_pruned], False)
    return keep


def keep_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (bool, shape (rows, cols)) keeping the n highest scores of every m consecutive columns.

    ``cols`` must be a multiple of m; ties prune the earlier column first.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M needs the row length ({cols}) to be a multiple of m={m}")
    groups = scores.reshape(rows * cols // m, m)
    return keep_per_row(groups, m - n).reshape(rows, cols)
