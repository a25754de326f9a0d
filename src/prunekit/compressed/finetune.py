"""Training a weight-shared model: keep every layer's shared weights tied (Han et al. 2016, §3.3).

After :func:`~prunekit.compressed.sharing.share_weights`, each shared layer holds at most 2^bits
distinct non-zero values. Deep Compression then fine-tunes the centroids: the gradient of centroid
c_k is the sum of the gradients of the weights in its cluster. :class:`SharedClusters` keeps the
clusters fixed and, after each optimizer step, sets every weight of cluster k to the cluster's mean
(and the pruned weights back to zero): with plain SGD that is c_k ← c_k − lr · mean of the cluster's
gradients, the paper's update with the sum divided by the cluster size; with momentum or Adam it is
the projection of their step back onto shared values. The layers then still hold at most 2^bits
values, so ``save_pruned(..., weight_bits=bits)`` stores them exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .sharing import resolve_bits


class SharedClusters:
    """The cluster of every weight of a weight-shared model, read off its current values (each distinct
    non-zero value is a cluster); :meth:`project` ties the weights again after an optimizer step.

    Args:
        model: a model after ``pk.share_weights(model, bits, inplace=True)`` (or loaded from such a file).
        bits: the same ``bits`` (int or dict) it was shared with; each named tensor must hold at most
            2^bits distinct non-zero values, or a ValueError says which does not.

    Example::

        shared = pk.share_weights(model, 3)
        clusters = pk.compressed.SharedClusters(shared, 3)
        for x, y in data:
            loss_fn(shared(x), y).backward(); optimizer.step(); optimizer.zero_grad()
            clusters.project()
        pk.save_pruned(shared, "m.pk", sparse=True, weight_bits=3)
    """

    def __init__(self, model: nn.Module, bits: int | Mapping[str, int | None]):
        state = model.state_dict(keep_vars=True)
        self.tensors: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        for key, layer_bits in resolve_bits(model, bits).items():
            tensor = state[key]
            values, inverse = torch.unique(tensor.detach(), return_inverse=True)
            nonzero = tensor.detach() != 0
            clusters = int((values != 0).sum())
            if clusters > 1 << layer_bits:
                raise ValueError(
                    f"{key} holds {clusters} distinct non-zero values, more than 2^{layer_bits}: "
                    "share the model with pk.share_weights(model, bits) first, with the same bits"
                )
            self.tensors.append((key, tensor, inverse.reshape(-1), nonzero, values.numel()))

    @torch.no_grad()
    def project(self) -> None:
        """Set each cluster's weights to their mean, and the weights that were zero back to zero."""
        for _, tensor, inverse, nonzero, count in self.tensors:
            flat = tensor.detach().reshape(-1)
            sums = torch.zeros(count, dtype=torch.float64, device=flat.device).index_add_(0, inverse, flat.double())
            sizes = torch.bincount(inverse, minlength=count).clamp_(min=1)
            means = (sums / sizes).to(flat.dtype)
            tensor.copy_(
                torch.where(nonzero, means[inverse].reshape(tensor.shape), torch.zeros((), dtype=tensor.dtype))
            )
