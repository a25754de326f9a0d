"""Sparse layer modules: a Linear, a Hugging Face ``Conv1D`` or a Conv2d whose weight is stored as a sparse
matrix and multiplied by a sparse kernel.

Every layer is a matrix product ``y = W x + b`` with ``W`` of shape ``(out, in)`` (a Conv2d's filters
flattened to ``(out, in·kh·kw)``, applied to the unfolded input patches, Chellapilla et al. 2006's
im2col). The weight is kept in one of these forms:

- ``"csr"``: compressed sparse rows with 32-bit indices (torch's kernels run faster with int32 than
  with the int64 that ``Tensor.to_sparse_csr()`` gives);
- ``"csr-linear"``: the same CSR matrix, multiplied as ``F.linear(x, W_csr)`` (Linear layers only; at
  batch 1 it can beat the transposed product below);
- ``"bsr"``: block sparse rows, for weights whose non-zeros fill whole ``h×w`` tiles (``pk.Block``);
- ``"semi"`` (CUDA only): torch's 2:4 semi-structured format for ``pk.NM(2, 4)`` weights.

The product is computed as ``(W_sparse @ xᵀ)ᵀ``: torch's CPU kernels for a sparse matrix on the left of
a dense one are several times faster than ``x @ W_sparseᵀ``.

The modules are for inference: their weight is a buffer, not a Parameter. Called with gradients enabled
on an input that requires a gradient, they raise (train the dense model, see :func:`prunekit.to_dense`).
Their ``state_dict`` holds the dense ``weight`` and ``bias`` under the original layer's keys and
layout, so a sparse model's state dict loads into the dense model and back.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = ("csr", "csr-linear", "bsr", "semi")

_WARNING_FILTERS = (
    "Sparse CSR tensor support is in beta state",
    "Sparse BSR tensor support is in beta state",
    "Sparse invariant checks are implicitly disabled",
)


def _quiet():
    """Silence torch's 'beta' warnings for sparse tensors (one per process, about torch, not the user's code)."""
    catcher = warnings.catch_warnings()
    catcher.__enter__()
    for message in _WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message)
    return catcher


def to_sparse_matrix(matrix: torch.Tensor, kernel: str, blocksize: tuple[int, int] | None = None) -> torch.Tensor:
    """``matrix`` (2-D, dense) in the storage ``kernel`` runs on: CSR or BSR with int32 indices, or 2:4
    semi-structured. ``blocksize`` (rows, columns) is required for ``"bsr"`` and must divide the shape."""
    catcher = _quiet()
    try:
        if kernel in ("csr", "csr-linear"):
            csr = matrix.detach().to_sparse_csr()
            return torch.sparse_csr_tensor(
                csr.crow_indices().to(torch.int32),
                csr.col_indices().to(torch.int32),
                csr.values(),
                csr.shape,
                check_invariants=False,
            )
        if kernel == "bsr":
            if blocksize is None:
                raise ValueError("kernel 'bsr' needs a blocksize (rows, columns)")
            if blocksize[0] != blocksize[1] and matrix.device.type == "cpu":
                raise ValueError(f"torch's CPU BSR kernel (MKL) needs square blocks, got {tuple(blocksize)}")
            bsr = matrix.detach().to_sparse_bsr(blocksize)
            return torch.sparse_bsr_tensor(
                bsr.crow_indices().to(torch.int32),
                bsr.col_indices().to(torch.int32),
                bsr.values(),
                bsr.shape,
                check_invariants=False,
            )
        if kernel == "semi":
            return torch.sparse.to_sparse_semi_structured(matrix.detach())
    finally:
        catcher.__exit__(None, None, None)
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")


def _dense_matrix(sparse: torch.Tensor) -> torch.Tensor:
    catcher = _quiet()
    try:
        return sparse.to_dense()
    finally:
        catcher.__exit__(None, None, None)


def _clone_sparse(sparse: torch.Tensor, kernel: str, blocksize, dense_matrix) -> torch.Tensor:
    if kernel in ("csr", "csr-linear"):
        parts = sparse.crow_indices(), sparse.col_indices(), sparse.values()
        return torch.sparse_csr_tensor(*(p.clone() for p in parts), sparse.shape, check_invariants=False)
    if kernel == "bsr":
        parts = sparse.crow_indices(), sparse.col_indices(), sparse.values()
        return torch.sparse_bsr_tensor(*(p.clone() for p in parts), sparse.shape, check_invariants=False)
    return to_sparse_matrix(dense_matrix(), kernel, blocksize)


def _refuse_training(module: nn.Module, x: torch.Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(
            f"{type(module).__name__} runs inference only: its sparse weight is a fixed buffer, so no gradient "
            "can flow through it. Run it under torch.no_grad() / torch.inference_mode(), or train the dense "
            "model (pk.to_dense(model)) and call pk.to_sparse again afterwards"
        )


class SparseLayer(nn.Module):
    """Base of the sparse modules: a sparse weight matrix ``(out, in)`` (buffer ``weight_sparse``), an
    optional dense bias (buffer), the kernel name, and the original layer (with its weight on the meta
    device, so it costs no memory) to rebuild it with :meth:`to_dense`.

    ``measured_gain`` (dense seconds / sparse seconds, or ``None`` when the kernel was forced) and
    ``measured_batch`` are what :func:`prunekit.to_sparse` measured; :func:`prunekit.summary` prints them.
    """

    #: Lets :func:`prunekit.summary` recognise these layers without importing this package.
    prunekit_sparse_layer = True

    def __init__(self, layer: nn.Module, matrix: torch.Tensor, bias: torch.Tensor | None, kernel: str, blocksize=None):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
        self.kernel = kernel
        self.blocksize = tuple(blocksize) if blocksize is not None else None
        self.out_features, self.in_features = matrix.shape
        self.weight_shape = tuple(layer.weight.shape)
        self.register_buffer("weight_sparse", to_sparse_matrix(matrix, kernel, self.blocksize), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.measured_gain: float | None = None
        self.measured_batch: int | None = None
        # The original layer without its weight data: hooks, buffers and attributes come back with to_dense.
        # Kept outside the module tree (not a submodule), so it adds nothing to state_dict or named_modules.
        shell = copy.copy(layer)
        shell._parameters = dict(layer._parameters)
        shell._parameters["weight"] = nn.Parameter(torch.empty(self.weight_shape, device="meta"), requires_grad=False)
        if shell._parameters.get("bias") is not None:
            shell._parameters["bias"] = nn.Parameter(torch.empty(shell.bias.shape, device="meta"), requires_grad=False)
        self.__dict__["_shell"] = shell
        self.__dict__["_weight_requires_grad"] = layer.weight.requires_grad

    def __deepcopy__(self, memo):
        # torch cannot deep-copy a sparse CSR/BSR tensor (it has no single storage): copy its parts.
        sparse = self._buffers["weight_sparse"]
        self._buffers["weight_sparse"] = None
        try:
            clone = type(self).__new__(type(self))
            memo[id(self)] = clone
            for key, value in self.__dict__.items():
                clone.__dict__[key] = copy.deepcopy(value, memo)
        finally:
            self._buffers["weight_sparse"] = sparse
        clone._buffers["weight_sparse"] = _clone_sparse(sparse, self.kernel, self.blocksize, self.dense_matrix)
        return clone

    # -- the dense weight in the original layer's layout ------------------------------------------------
    def dense_matrix(self) -> torch.Tensor:
        """The weight as a dense ``(out, in)`` matrix."""
        if self.kernel == "semi":
            return self.weight_sparse.to_dense().contiguous()  # SparseSemiStructuredTensor.to_dense: exact
        return _dense_matrix(self.weight_sparse)

    def dense_weight(self) -> torch.Tensor:
        """The weight in the original layer's shape and layout."""
        return self.dense_matrix().reshape(self.weight_shape)

    def nonzero_weights(self) -> int:
        """How many weights are non-zero (stored zeros, e.g. in a BSR tile, are not counted)."""
        if self.kernel == "semi":
            return int(torch.count_nonzero(self.dense_matrix()))
        return int(torch.count_nonzero(self.weight_sparse.values()))

    def describe(self) -> str:
        """The kernel and what was measured: ``"csr ×2.40 at batch 16"``, ``"bsr 16×16 (forced)"``."""
        label = f"bsr {self.blocksize[0]}×{self.blocksize[1]}" if self.kernel == "bsr" else self.kernel
        if self.measured_gain is None:
            return f"{label} (forced)"
        return f"{label} ×{self.measured_gain:.2f} at batch {self.measured_batch}"

    #: Whether :func:`prunekit.summary` without example inputs counts it as applied once (as a Linear).
    counts_once_without_inputs = False

    def summary_counts(self, applied: int | None) -> tuple[str, int, int, int | None, int | None]:
        """(kind, parameters, non-zero parameters, MACs, non-zero MACs) of the dense layer this stands for, its
        weights (zeros included) and bias, applied ``applied`` times (``None``: MACs unknown)."""
        weights, nonzero_weights = self.out_features * self.in_features, self.nonzero_weights()
        params, nonzero = weights, nonzero_weights
        if self.bias is not None:
            params, nonzero = params + self.bias.numel(), nonzero + int(torch.count_nonzero(self.bias))
        macs = (weights * applied, nonzero_weights * applied) if applied is not None else (None, None)
        return (f"{type(self).__name__} [{self.describe()}]", params, nonzero, *macs)

    def to_dense(self) -> nn.Module:
        """The original layer type with the same weights (bit-identical) and bias, on this module's device."""
        layer = copy.copy(self._shell)
        layer._parameters = dict(self._shell._parameters)
        weight = self.dense_weight()
        layer._parameters["weight"] = nn.Parameter(weight, requires_grad=self._weight_requires_grad)
        if self.bias is not None:
            layer._parameters["bias"] = nn.Parameter(self.bias.clone(), requires_grad=self._weight_requires_grad)
        return layer

    # -- state dict: dense tensors under the original keys ------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        weight_key, bias_key = prefix + "weight", prefix + "bias"
        if weight_key not in state_dict:
            missing_keys.append(weight_key)
        else:
            weight = state_dict[weight_key]
            if tuple(weight.shape) != self.weight_shape:
                errors.append(
                    f"size mismatch for {weight_key}: copying a param with shape {tuple(weight.shape)}, "
                    f"the sparse layer holds {self.weight_shape}"
                )
            else:
                matrix = self._matrix_from_weight(weight.to(self.weight_sparse.device, self.weight_sparse.dtype))
                self.weight_sparse = to_sparse_matrix(matrix, self.kernel, self.blocksize)
        if self.bias is not None:
            if bias_key not in state_dict:
                missing_keys.append(bias_key)
            else:
                self.bias = state_dict[bias_key].detach().to(self.bias.device, self.bias.dtype).clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        for key in (weight_key, bias_key):
            if key in unexpected_keys:
                unexpected_keys.remove(key)

    def _matrix_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.out_features, self.in_features)

    # -- the product --------------------------------------------------------------------------------------
    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ Wᵀ + b`` for a 2-D ``rows`` (N, in): (N, out), contiguous."""
        if self.kernel in ("semi", "csr-linear"):
            return F.linear(rows, self.weight_sparse, self.bias)
        if self.bias is None:
            product = torch.mm(self.weight_sparse, rows.t())
        else:
            product = torch.addmm(self.bias.unsqueeze(1), self.weight_sparse, rows.t())
        return product.t().contiguous()

    def extra_repr(self) -> str:
        block = f", blocksize={self.blocksize}" if self.kernel == "bsr" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel!r}{block}, "
            f"bias={self.bias is not None}, density={self.nonzero_weights() / max(1, self.in_features * self.out_features):.3f}"
        )


class SparseLinear(SparseLayer):
    """An ``nn.Linear`` (or Hugging Face ``Conv1D``, whose weight is stored (in, out)) with a sparse weight."""

    counts_once_without_inputs = True

    def __init__(self, layer: nn.Module, kernel: str, blocksize=None):
        transposed = type(layer).__name__ == "Conv1D"
        weight = layer.weight.detach()
        matrix = weight.t() if transposed else weight
        super().__init__(layer, matrix.contiguous(), layer.bias, kernel, blocksize)
        self.transposed = transposed

    def dense_weight(self) -> torch.Tensor:
        matrix = self.dense_matrix()
        return matrix.t().contiguous() if self.transposed else matrix

    def _matrix_from_weight(self, weight):
        return weight.t().contiguous() if self.transposed else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_training(self, x)
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"{type(self).__name__} expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        rows = x.reshape(-1, self.in_features)
        return self._matmul(rows).reshape(*x.shape[:-1], self.out_features)


def conv2d_supported(layer: nn.Module) -> str | None:
    """Why a Conv2d cannot run as a sparse matrix product, or ``None`` when it can."""
    if not isinstance(layer, nn.Conv2d):
        return f"{type(layer).__name__} is not a Conv2d"
    if layer.groups != 1:
        return f"grouped convolution (groups={layer.groups})"
    if layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r}"
    if isinstance(layer.padding, str):
        return f"padding={layer.padding!r} (give the padding as numbers)"
    return None


class SparseConv2d(SparseLayer):
    """An ``nn.Conv2d`` (groups 1, zero padding) run as its matrix form: the sparse filter matrix
    ``(out, in·kh·kw)`` times the unfolded input patches (a 1×1 convolution, stride 1, needs no unfold)."""

    def __init__(self, layer: nn.Conv2d, kernel: str, blocksize=None):
        reason = conv2d_supported(layer) or (
            "kernel 'csr-linear' is for Linear layers" if kernel == "csr-linear" else None
        )
        if reason is not None:
            raise ValueError(f"cannot run this Conv2d sparse: {reason}")
        matrix = layer.weight.detach().reshape(layer.out_channels, -1)
        super().__init__(layer, matrix.contiguous(), layer.bias, kernel, blocksize)
        self.kernel_size = tuple(layer.kernel_size)
        self.stride = tuple(layer.stride)
        self.padding = tuple(layer.padding)
        self.dilation = tuple(layer.dilation)
        self.pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_training(self, x)
        unbatched = x.ndim == 3
        if unbatched:
            x = x.unsqueeze(0)
        batch, _, height, width = x.shape
        if self.pointwise:
            out_h, out_w = height, width
            columns = x.transpose(0, 1).reshape(self.in_features, -1)  # (in, N·H·W)
        else:
            kh, kw = self.kernel_size
            out_h = (height + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
            out_w = (width + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
            patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, in·kh·kw, L)
            columns = patches.transpose(0, 1).reshape(self.in_features, -1)
        if self.kernel == "semi":
            product = F.linear(columns.t(), self.weight_sparse, self.bias).t()
        elif self.bias is None:
            product = torch.mm(self.weight_sparse, columns)
        else:
            product = torch.addmm(self.bias.unsqueeze(1), self.weight_sparse, columns)
        out = product.reshape(self.out_features, batch, out_h, out_w).transpose(0, 1).contiguous()
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return (
            f"{self.in_features // (self.kernel_size[0] * self.kernel_size[1])}, {self.out_features}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, {super().extra_repr()}"
        )
