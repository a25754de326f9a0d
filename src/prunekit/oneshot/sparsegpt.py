"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot"), for one Linear layer.

Given the layer-wise Hessian H = 2XXᵀ of the reconstruction error ‖WX − ŴX‖² (X: the layer's inputs,
in_features × tokens), columns are pruned left to right. With U the upper Cholesky factor of H⁻¹
(so [H_F⁻¹]_jj = U_jj² for the columns F still unpruned), a weight w_ij costs w_ij² / U_jj² to remove
(the OBS saliency), and removing it updates the columns still to come by δ_i = −(w_ij / U_jj)·U_j,j:
(the OBS update, Hassibi & Stork 1993). Details as published:

- damping: λ = 1% of mean(diag H) added to the diagonal;
- dead inputs (H_jj = 0: a feature that is always zero) get H_jj = 1 and their weights set to 0;
- adaptive mask selection: the mask of each block of 128 columns is chosen when the block is reached,
  from the saliencies at that point (the block's lowest fraction ``sparsity``, across all rows; the count is rounded to
  the nearest whole weight, where the paper truncates, so non-uniform OWL sparsities add up exactly);
  N:M picks the n best of every m columns in each row when the group is reached;
- lazy batched updates: inside a block of 128 columns the update is applied column by column, and the
  columns after the block receive the block's accumulated update in one matrix product.

Everything runs in float32 (the Hessian of a Linear of a few thousand inputs is well conditioned once
damped). If the Cholesky factorisation fails, the damping is raised tenfold (up to three times); if it
still fails, a warning names the layer and it is pruned by saliency w²·H_jj without weight update.
"""

from __future__ import annotations

import warnings

import torch

BLOCK_SIZE = 128
DAMPING = 0.01


def _inverse_cholesky(hessian: torch.Tensor, damping: float, name: str) -> tuple[torch.Tensor, bool]:
    """Upper Cholesky factor of (H + λI)⁻¹, and whether it succeeded (else a diagonal fallback).

    Damps ``hessian`` in place (it is the caller's scratch copy), so at most three in × in matrices are
    alive at once.
    """
    diagonal = hessian.diagonal()
    mean_diag = float(diagonal.mean())
    added = 0.0
    for attempt in range(4):
        step = damping * (10**attempt) * mean_diag - added
        diagonal += step
        added += step
        lower, info = torch.linalg.cholesky_ex(hessian)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, True
    warnings.warn(
        f"SparseGPT: the Hessian of {name!r} is not positive definite even with {damping * 1000:g}× the "
        "usual damping; that layer is pruned by its saliency w²·H_jj without weight update "
        "(more calibration tokens usually fix this)",
        RuntimeWarning,
        stacklevel=3,
    )
    diagonal = torch.nan_to_num((diagonal - added).abs(), nan=1.0, posinf=1.0).clamp_min(1e-12)
    return torch.diag(diagonal.rsqrt()), False


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` lowest entries of ``scores`` (ties: earlier position first).

    The same mask as the first ``count`` indices of a stable ascending sort, found without sorting: the
    entries below the ``count``-th smallest value v, then the earliest entries equal to v (selection is
    linear where the sort of a 128-column block was a large share of SparseGPT's time on CPU).
    """
    flat = scores.reshape(-1)
    if count == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if bool(torch.isnan(flat).any()):  # NaN has no place in the order kthvalue uses; sort puts it last
        pruned = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        pruned[torch.sort(flat, stable=True).indices[:count]] = True
        return pruned.view_as(scores)
    value = torch.kthvalue(flat, count).values
    pruned = flat < value
    ties = flat == value
    missing = count - int(pruned.sum())
    pruned |= ties & (torch.cumsum(ties, 0) <= missing)
    return pruned.view_as(scores)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    *,
    block_size: int = BLOCK_SIZE,
    damping: float = DAMPING,
    name: str = "layer",
    overwrite_hessian: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out × in, any float dtype) given its Hessian H = 2XXᵀ (in × in).

    ``sparsity``: fraction of each 128-column block to prune (ignored with ``nm=(n, m)``, which keeps n
    of every m consecutive inputs in each row). Returns ``(new weight, keep-mask)``: the updated weight in
    ``weight``'s dtype with the pruned entries at zero, and the bool mask (True = kept).
    ``overwrite_hessian=True`` lets a float32 ``hessian`` be used as scratch space (saves one copy).
    """
    rows, cols = weight.shape
    w = weight.detach().to(device=hessian.device, dtype=torch.float32, copy=True)
    h = hessian if overwrite_hessian and hessian.dtype == torch.float32 else hessian.to(torch.float32, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    upper, _ = _inverse_cholesky(h, damping, name)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    if nm is not None:
        n, m = nm
        block_size = max(m, block_size // m * m)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w_block = w[:, start:end].clone()
        u_block = upper[start:end, start:end]
        u_diag = u_block.diagonal()
        errors = torch.zeros_like(w_block)
        if nm is None:
            block_pruned = _lowest(
                w_block.pow(2) / u_diag.pow(2), min(round(w_block.numel() * sparsity), w_block.numel() - 1)
            )
        else:
            block_pruned = torch.zeros_like(w_block, dtype=torch.bool)
        for i in range(end - start):
            if nm is not None and i % m == 0:
                saliency = w_block[:, i : i + m].pow(2) / u_diag[i : i + m].pow(2)
                order = torch.sort(saliency, dim=1, stable=True).indices[:, : m - n]
                block_pruned[:, i : i + m].scatter_(1, order, True)
            column = w_block[:, i]
            error = torch.where(block_pruned[:, i], column, 0.0) / u_diag[i]
            # OBS update of this block's remaining columns (column i itself becomes exactly 0 or stays)
            w_block[:, i:].sub_(error.unsqueeze(1) * u_block[i, i:].unsqueeze(0))
            w_block[:, i].masked_fill_(block_pruned[:, i], 0.0)
            errors[:, i] = error
        w[:, start:end] = w_block
        pruned[:, start:end] = block_pruned
        if end < cols:  # lazy batch update of the columns after this block
            w[:, end:].sub_(errors @ upper[start:end, end:])
    keep = ~pruned
    w.mul_(keep)
    return w.to(weight.dtype), keep
