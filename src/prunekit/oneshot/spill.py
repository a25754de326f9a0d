"""Tensors kept in memory up to a byte budget, and in files of a temporary directory beyond it.

Structured pruning with reconstruction holds two sets of tensors for the length of one call: the
dense values of what it changes (:mod:`.snapshot`, to restore the model on failure and to rebuild the
dense model for one pass) and the dense outputs the refit fits (:mod:`.reconstruct`). On a large model
either can be as large as the model itself; beyond the budget they go to disk, so the call's extra
memory stays bounded whatever the model's size.
"""

from __future__ import annotations

import os
import tempfile

import torch


class SpillStore:
    """``put`` a tensor, ``get`` it back (an equal tensor on its device); in memory while the stored
    bytes stay within ``limit`` (bytes), then one file per tensor in a temporary directory, removed by
    :meth:`close`."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.nbytes = 0
        self.in_memory = 0
        self._items: list[torch.Tensor | tuple[str, torch.device]] = []
        self._directory: tempfile.TemporaryDirectory | None = None

    def put(self, tensor: torch.Tensor, copy: bool = False) -> int:
        """Keep ``tensor``'s values; returns the handle to :meth:`get` them. ``copy``: keep a copy in
        memory (for a tensor that will change); without it, pass a tensor nothing else writes to. A
        tensor that goes to disk is written at once, so it is never copied in memory."""
        size = tensor.numel() * tensor.element_size()
        self.nbytes += size
        if self.in_memory + size <= self.limit:
            self.in_memory += size
            self._items.append(tensor.detach().clone() if copy else tensor)
        else:
            if self._directory is None:
                self._directory = tempfile.TemporaryDirectory(prefix="prunekit-spill-")
            path = os.path.join(self._directory.name, f"{len(self._items)}.pt")
            torch.save(tensor.detach().cpu(), path)
            self._items.append((path, tensor.device))
        return len(self._items) - 1

    def get(self, handle: int) -> torch.Tensor:
        item = self._items[handle]
        if isinstance(item, torch.Tensor):
            return item
        path, device = item
        return torch.load(path, weights_only=True).to(device)

    def close(self) -> None:
        """Delete the files (the tensors kept in memory stay readable)."""
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None
