"""Engines: turn a configuration, targets and scores into masks, and keep masks enforced.

- :mod:`.selection`: exact k-lowest selection across layers (global or local), memory-bounded;
- :mod:`.unstructured`: per-layer masks for weights, kernels, channels, blocks and N:M;
- :mod:`.coupled`: whole dependency groups for structured pruning (:mod:`prunekit.structure`);
- :mod:`.constraints`: applies post-selection constraints (the FHE fan-in cap) to proposed masks;
- :mod:`.calibration`: the shared pass that collects activation statistics for data-aware criteria;
- :mod:`.enforcement`: holds the masks on the model, re-applies them, hooks optimizers;
- :mod:`.persistence`: the pruner's state dict, validated before anything changes.

An engine receives what it needs and returns masks; it never reaches back into the pruner.
"""
