"""Weight sharing by k-means, per layer (Han et al. 2016, "Deep Compression", §3).

The non-zero weights W of one layer are clustered into k = 2^bits clusters C_1..C_k minimising
Σ_i Σ_{w ∈ C_i} |w − c_i|² (one-dimensional Lloyd iterations: assign each weight to its nearest
centroid, move each centroid to its cluster's mean, until no assignment changes). Each weight is then
replaced by its centroid, so a layer holds at most 2^bits distinct non-zero values, stored as a
codebook plus a bits-wide index per weight. Zeros are not clustered and stay exactly zero.

Centroid initialisation (the paper's §3.1):

- ``"linear"`` (the paper's best): k points evenly spaced between the smallest and the largest weight;
  this is also plain uniform quantization, which Lloyd iterations can only improve on;
- ``"density"``: the (j + ½)/k quantiles of the weights (evenly spaced in the CDF);
- ``"random"``: k distinct weights drawn at random (Forgy), seeded.

A layer with at most k distinct non-zero values keeps them exactly (re-sharing a shared model changes
nothing). The paper then fine-tunes the centroids; prunekit does not (retrain the shared model
yourself if you need to).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core.targets import is_hf_conv1d, name_matches

INITS = ("linear", "density", "random")
KINDS = ("conv", "linear", "embedding", "bias")
CODEBOOK_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def kmeans_1d(
    values: np.ndarray, clusters: int, init: str = "linear", seed: int = 0, iterations: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """``(centroids, assignment)``: 1-D k-means of ``values`` (float64) into at most ``clusters``
    clusters; centroids sorted ascending, unused ones dropped, ``assignment[i]`` the centroid of value i."""
    if init not in INITS:
        raise ValueError(f"unknown k-means initialisation {init!r}; use one of {', '.join(map(repr, INITS))}")
    distinct = np.unique(values)
    if distinct.size <= clusters:
        return distinct, np.searchsorted(distinct, values)
    if init == "linear":
        centroids = np.linspace(values.min(), values.max(), clusters)
    elif init == "density":
        centroids = np.quantile(values, (np.arange(clusters) + 0.5) / clusters)
    else:
        centroids = np.sort(np.random.default_rng(seed).choice(distinct, clusters, replace=False))
    centroids, assignment = _lloyd(values, centroids, iterations)
    # Pruning leaves a gap around zero, and linear initialisation puts centroids in it that never get a
    # weight: move each empty one onto the weight farthest from its centroid (which can only lower the
    # error) and iterate again, so all 2^bits values are used.
    for _ in range(clusters):
        counts = np.bincount(assignment, minlength=clusters)
        empty = np.flatnonzero(counts == 0)
        if empty.size == 0:
            break
        error = (values - centroids[assignment]) ** 2
        for slot, index in zip(empty, np.argsort(error, kind="stable")[::-1]):
            centroids[slot] = values[index]
        centroids, assignment = _lloyd(values, centroids, iterations)
    used = np.unique(assignment)
    remap = np.zeros(clusters, dtype=np.int64)
    remap[used] = np.arange(used.size)
    # Two empty slots moved onto equal values give equal centroids: merge them (the error is the same)
    # and sort, so the codebook holds distinct values in ascending order.
    merged, inverse = np.unique(centroids[used], return_inverse=True)
    return merged, inverse.reshape(-1)[remap[assignment]]


def _lloyd(values: np.ndarray, centroids: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations from ``centroids`` until no assignment changes; empty clusters keep their centroid.

    In one dimension every cluster is a run of the sorted values, so each iteration only looks up the
    k − 1 boundaries (midpoints between centroids) in the sorted values and takes the run means from
    prefix sums: O(k log n) per iteration after one sort."""
    ordered = np.sort(values)
    prefix = np.concatenate([[0.0], np.cumsum(ordered)])
    bounds = None
    for _ in range(iterations):
        centroids = np.sort(centroids)
        # A value on a midpoint goes to the lower centroid, as in nearest().
        ends = np.concatenate(
            [[0], np.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2, side="right"), [ordered.size]]
        )
        if bounds is not None and np.array_equal(ends, bounds):
            break
        bounds = ends
        counts = np.diff(ends)
        sums = prefix[ends[1:]] - prefix[ends[:-1]]
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
    centroids = np.sort(centroids)
    return centroids, nearest(centroids, values)


def nearest(centroids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``centroids`` for each value (ties to the lower one)."""
    return np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values, side="left")


@dataclass
class SharedTensor:
    """A tensor after weight sharing: ``codebook`` (1-D, in ``codebook.dtype``) and ``codes``, one per
    element in C order: the element's centroid, or ``len(codebook)`` for a zero."""

    codebook: torch.Tensor
    codes: np.ndarray

    def values(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The shared tensor: each element its centroid (cast to ``dtype``), zeros where code = len(codebook)."""
        table = torch.cat([self.codebook.to(dtype), torch.zeros(1, dtype=dtype)])
        return table[torch.from_numpy(self.codes)].reshape(shape)


def share_tensor(
    tensor: torch.Tensor,
    bits: int,
    init: str = "linear",
    codebook_dtype: str = "float32",
    seed: int = 0,
    name: str = "",
) -> SharedTensor:
    """Weight sharing of one tensor: k-means of its non-zero values into 2^bits centroids."""
    flat = tensor.detach().reshape(-1).cpu()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{name or 'the tensor'} holds NaN or infinite values; weight sharing needs finite weights")
    values = flat.double().numpy()
    nonzero = values != 0
    centroids, assignment = kmeans_1d(values[nonzero], 1 << bits, init, seed)
    codebook = torch.from_numpy(centroids).to(CODEBOOK_DTYPES[codebook_dtype])
    codes = np.full(values.size, codebook.numel(), dtype=np.int64)
    codes[nonzero] = assignment
    return SharedTensor(codebook, codes)


def check_bits(bits: object, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"{what} must be an integer number of bits from 1 to 8, got {bits!r}")
    return bits


def tensor_kinds(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``state_dict key -> (kind, module name)`` for the weights and biases weight sharing can apply to:
    the weights of convolutions (``"conv"``), Linear layers, Hugging Face's Conv1D and
    ``nn.MultiheadAttention``'s input projections (``"linear"``) and embeddings (``"embedding"``), and
    those layers' biases (``"bias"``)."""
    kinds = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            kind = "conv"
        elif isinstance(module, nn.Linear) or is_hf_conv1d(module):
            kind = "linear"
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            kind = "embedding"
        elif isinstance(module, nn.MultiheadAttention):
            kind = "linear"  # its input projections; out_proj is an nn.Linear of its own
        else:
            continue
        prefix = f"{module_name}." if module_name else ""
        names = [("weight", kind), ("bias", "bias")]
        if isinstance(module, nn.MultiheadAttention):
            names = [(n, "linear") for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")]
            names.append(("in_proj_bias", "bias"))
        for param_name, kind_of in names:
            param = module._parameters.get(param_name)
            if param is not None and param.is_floating_point():
                kinds[prefix + param_name] = (kind_of, module_name)
    return kinds


def resolve_bits(model: nn.Module, weight_bits: int | Mapping[str, int | None]) -> dict[str, int]:
    """``state_dict key -> bits`` from ``weight_bits``: an integer for every conv, linear and embedding
    weight, or a dict whose keys are kinds (``"conv"``, ``"linear"``, ``"embedding"``, ``"bias"``) or
    module-name patterns (regular expressions, matched as in ``include=``: the module or a parent),
    a pattern overriding a kind for the weights it matches (biases follow the ``"bias"`` entry only);
    a value of None leaves the matching tensors as they are."""
    kinds = tensor_kinds(model)
    if isinstance(weight_bits, Mapping):
        spec = dict(weight_bits)
    else:
        bits = check_bits(weight_bits, "weight_bits")
        spec = {"conv": bits, "linear": bits, "embedding": bits}
    for key, bits in spec.items():
        if not isinstance(key, str):
            raise TypeError(f"weight_bits keys must be strings (a kind or a module-name pattern), got {key!r}")
        if bits is not None:
            check_bits(bits, f"weight_bits[{key!r}]")
    patterns = {k: v for k, v in spec.items() if k not in KINDS}
    unmatched = [p for p in patterns if not any(name_matches(p, module) for _, module in kinds.values())]
    if unmatched:
        raise ValueError(
            f"weight_bits names {unmatched}, which match no conv, linear or embedding layer; "
            f"use a kind ({', '.join(KINDS)}) or a module name of the model"
        )
    result = {}
    for key, (kind, module_name) in kinds.items():
        bits = spec.get(kind)
        if kind != "bias":  # biases follow the "bias" entry only
            for pattern, pattern_bits in patterns.items():
                if name_matches(pattern, module_name):
                    bits = pattern_bits
        if bits is not None:
            result[key] = bits
    return result


def share_weights(
    model: nn.Module,
    bits: int | Mapping[str, int | None],
    *,
    init: str = "linear",
    codebook_dtype: str = "float32",
    seed: int = 0,
    inplace: bool = False,
) -> nn.Module:
    """Apply weight sharing (k-means per layer, Han et al. 2016) to ``model``'s weights, so its accuracy
    can be measured before saving; returns the shared model (a deep copy unless ``inplace``).

    ``bits`` as ``weight_bits`` of :func:`prunekit.save_pruned`: an integer (2^bits shared values per
    conv, linear and embedding weight) or a dict per kind / module-name pattern, e.g. ``{"conv": 8,
    "linear": 5}``. Biases and other tensors stay as they are unless a ``"bias"`` entry asks.
    ``codebook_dtype`` ``"float32"`` or ``"float16"`` rounds the centroids as the file stores them.
    ``pk.save_pruned(model, path, sparse=True, weight_bits=bits)`` writes exactly these values, and
    saving the returned model with the same ``bits`` writes the same file.
    """
    if codebook_dtype not in CODEBOOK_DTYPES:
        raise ValueError(
            f"codebook_dtype must be one of {', '.join(map(repr, CODEBOOK_DTYPES))}, got {codebook_dtype!r}"
        )
    if init not in INITS:
        raise ValueError(f"unknown k-means initialisation {init!r}; use one of {', '.join(map(repr, INITS))}")
    plan = resolve_bits(model, bits)
    state = model.state_dict(keep_vars=True)
    shared = {
        key: share_tensor(state[key], b, init, codebook_dtype, seed, key).values(state[key].dtype, state[key].shape)
        for key, b in plan.items()
    }
    target = model if inplace else copy.deepcopy(model)
    target_state = target.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, values in shared.items():
            target_state[key].copy_(values)
    return target
