"""What structured pruning with reconstruction keeps of the dense model: a copy of only the tensors
that pruning and reconstruction may change, never a second model.

The copied tensors are the own parameters and buffers of the modules that are pruned (the pruner's
targets), of the modules whose tensors are sliced with them (norms, embeddings, ...), and of the
BatchNorms that take bias shifts. From the copy the model is restored when reconstruction fails, the
removed channels' dense weights are read (bias compensation), and the dense model is recreated in
place for one pass (:meth:`TensorSnapshot.dense_model`) to record the dense outputs the refit fits.
Beyond a byte budget the copies are kept on disk (:mod:`.spill`), so a large model's copy does not
have to fit in memory beside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..core import masks as mask_store
from ..core.masks import MASK_PREFIX
from .spill import SpillStore


class TensorSnapshot:
    """Copies of the own parameters and buffers (masks apart) of ``modules``, and of their masks: in
    memory up to ``memory_bytes``, the rest in a temporary directory (:class:`.spill.SpillStore`; call
    :meth:`close` when done)."""

    def __init__(self, modules: Iterable[nn.Module], memory_bytes: int):
        self.store = SpillStore(memory_bytes)
        self.tensors: dict[tuple[nn.Module, str], int] = {}
        self.masks: dict[nn.Module, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for module in dict.fromkeys(modules):
                for name, value in list(module._parameters.items()) + list(module._buffers.items()):
                    if value is not None and not name.startswith(MASK_PREFIX):
                        self.tensors[(module, name)] = self.store.put(value.detach(), copy=True)
                self.masks[module] = {n: b.clone() for n, b in module._buffers.items() if n.startswith(MASK_PREFIX)}

    @property
    def nbytes(self) -> int:
        """Bytes held by the copies (in memory or on disk)."""
        return self.store.nbytes

    def dense(self, module: nn.Module, name: str) -> torch.Tensor:
        """The value ``module.<name>`` had when the snapshot was taken."""
        return self.store.get(self.tensors[(module, name)])

    def close(self) -> None:
        """Delete what went to disk."""
        self.store.close()

    @contextmanager
    @torch.no_grad()
    def dense_model(self) -> Iterator[None]:
        """Inside: the copied tensors hold their dense values again. On exit the pruned entries are zeroed
        again by the masks now on the modules, which gives back exactly the pruned model; so use it only
        between pruning (which changes nothing but the masked entries) and the first refit."""
        current = [(module, name) for module, name in self.tensors if getattr(module, name) is not None]
        try:
            for module, name in current:
                getattr(module, name).copy_(self.dense(module, name))
            yield
        finally:
            for module, name in current:
                keep = mask_store.get_mask(module, name)
                if keep is not None:
                    mask_store.zero_pruned(getattr(module, name), keep)

    @torch.no_grad()
    def restore(self, added: list[nn.Module]) -> None:
        """Put every copied tensor and mask back; ``added``: modules that were given a new bias."""
        for module in added:
            module.bias = None
        for module, name in self.tensors:
            getattr(module, name).copy_(self.dense(module, name))
        for module, masks in self.masks.items():
            for name in [b for b in module._buffers if b.startswith(MASK_PREFIX)]:
                if name in masks:
                    module._buffers[name] = masks[name].clone()
                else:
                    del module._buffers[name]
