"""Compressed files: a pruned model stored as what is left of it (Han et al. 2016, "Deep Compression").

``pk.save_pruned(model, path, sparse=True)`` writes every tensor of the state dict as its non-zero
values plus the cheapest index form for its pattern (:mod:`.encode`: bitmask, Deep Compression's
relative indices, N:M positions, kept rows, or nothing for dense tensors), each stream entropy-coded
(:mod:`.entropy`: zstandard or Huffman, whichever is smaller), in a versioned, checksummed container
without pickle (:mod:`.format`, which documents the layout). It reloads bit for bit.
``weight_bits=`` adds weight sharing (:mod:`.sharing`: k-means per layer, 2^bits shared values), and
:func:`share_weights` applies the same quantization to a model so its accuracy can be measured first,
and :class:`SharedClusters` keeps the shared values tied while it is retrained.
"""

from .entropy import zstandard_available
from .files import inspect_file, load_compressed, read_state, save_compressed
from .finetune import SharedClusters
from .format import FORMAT_VERSION, CompressedFileError, is_compressed_file
from .loading import load_into
from .report import FileReport, TensorReport
from .sharing import kmeans_1d, share_weights

__all__ = [
    "FORMAT_VERSION",
    "CompressedFileError",
    "FileReport",
    "SharedClusters",
    "TensorReport",
    "inspect_file",
    "is_compressed_file",
    "kmeans_1d",
    "load_compressed",
    "load_into",
    "read_state",
    "save_compressed",
    "share_weights",
    "zstandard_available",
]
