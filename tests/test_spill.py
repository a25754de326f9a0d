"""The spill store of structured pruning with reconstruction: the same tensors back, from memory or disk."""

from __future__ import annotations

import os

import torch

from prunekit.oneshot.spill import SpillStore


def test_tensors_within_the_budget_stay_in_memory_and_the_rest_go_to_disk():
    store = SpillStore(limit=3 * 4 * 8)  # three 8-float tensors
    tensors = [torch.randn(8) for _ in range(5)]
    handles = [store.put(t) for t in tensors]
    assert store.in_memory == 3 * 4 * 8 and store.nbytes == 5 * 4 * 8
    assert store.get(handles[0]) is tensors[0]  # kept as it is: no copy without copy=True
    for handle, tensor in zip(handles, tensors):
        assert torch.equal(store.get(handle), tensor)
    files = os.listdir(store._directory.name)
    assert len(files) == 2
    store.close()
    assert store._directory is None


def test_copy_keeps_the_values_a_tensor_had_when_it_was_put():
    for limit in (0, 1 << 20):  # on disk, or copied in memory
        store = SpillStore(limit)
        tensor = torch.arange(6.0)
        handle = store.put(tensor, copy=True)
        tensor.zero_()
        assert torch.equal(store.get(handle), torch.arange(6.0))
        store.close()
