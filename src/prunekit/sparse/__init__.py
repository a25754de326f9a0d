"""Sparse execution: run a pruned model's layers with sparse kernels where that is faster.

:func:`to_sparse` swaps each Linear / Conv1D / Conv2d for a :class:`SparseLinear` / :class:`SparseConv2d`
(CSR or BSR with 32-bit indices, or 2:4 semi-structured on CUDA) when a measurement on the example inputs
says it is faster; :func:`to_dense` undoes it.
"""

from .api import SparseReport, to_dense, to_sparse
from .choose import Choice, block_size, is_two_four
from .kernels import SparseConv2d, SparseLayer, SparseLinear

__all__ = [
    "Choice",
    "SparseConv2d",
    "SparseLayer",
    "SparseLinear",
    "SparseReport",
    "block_size",
    "is_two_four",
    "to_dense",
    "to_sparse",
]
