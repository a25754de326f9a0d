"""One-shot, data-aware pruning of trained models from calibration batches (issue 11).

- :mod:`.structured`: heads, neurons and channels scored from activations (Wanda-style groups, FLAP's
  fluctuation), with optional reconstruction of the layers that read them;
- :mod:`.reconstruct`: the least-squares refit and bias compensation;
- :mod:`.activations`: per-channel calibration statistics.
"""

from .structured import prune_structured_with_calibration

__all__ = ["prune_structured_with_calibration"]
