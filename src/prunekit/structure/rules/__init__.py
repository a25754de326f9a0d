"""The built-in tracing rules, one module per family of operations; importing this package registers
them (see :mod:`prunekit.structure.registry` for the rule signature and how to add one).

- :mod:`.elementwise`: identity-like calls, fresh tensors, arithmetic and activation functions, GLU;
- :mod:`.reductions`: reductions, softmax-like operations along a dimension, pooling and resizing;
- :mod:`.movement`: view/reshape/permute/cat/split/indexing and writes (``x[i] = y``, ``copy_``),
  with the notes on positional selections and dimension splits that units are checked against;
- :mod:`.layers`: linear, convolutions, transposed convolutions, batch/instance/layer/RMS/group norm,
  embedding;
- :mod:`.attention`: matrix products, einsum, scaled dot-product attention and nn.MultiheadAttention.
"""

from . import attention, elementwise, layers, movement, reductions

__all__ = ["attention", "elementwise", "layers", "movement", "reductions"]
