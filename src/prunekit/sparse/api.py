"""``to_sparse`` / ``to_dense``: swap a pruned model's layers for sparse-kernel modules where that is faster,
and back."""

from __future__ import annotations

import copy
import fnmatch
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.inputs import call_model
from .choose import Choice, build, candidates, choose, interleaved_seconds, unsupported, weight_matrix
from .kernels import SparseLayer

KERNEL_CHOICES = ("auto", "csr", "csr-linear", "bsr", "semi", "dense")


@dataclass
class SparseReport:
    """What :func:`to_sparse` did, kept on the returned model as ``model.prunekit_sparse``.

    ``layers``: one :class:`~prunekit.sparse.choose.Choice` per Linear/Conv1D/Conv2d, by module name.
    ``seconds``: median seconds per forward pass of the whole model on the example inputs, ``{"dense": …,
    "sparse": …}`` (measured with ``kernel="auto"`` only). ``batch``: the example batch size.
    """

    layers: dict[str, Choice] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    batch: int | None = None

    @property
    def gain(self) -> float | None:
        """Dense seconds / sparse seconds of the whole model, or ``None`` when not measured."""
        if "dense" in self.seconds and "sparse" in self.seconds:
            return self.seconds["dense"] / self.seconds["sparse"]
        return None

    def notes(self) -> list[str]:
        """Lines for :func:`prunekit.summary`: how many layers run which kernel, and the whole model's gain."""
        kinds: dict[str, int] = {}
        for choice in self.layers.values():
            kinds[choice.kernel] = kinds.get(choice.kernel, 0) + 1
        counts = ", ".join(f"{count} {kernel}" for kernel, count in sorted(kinds.items()))
        lines = [f"to_sparse: {len(self.layers)} layers considered ({counts})"]
        if self.gain is not None:
            lines.append(
                f"to_sparse: whole model ×{self.gain:.2f} at batch {self.batch} "
                f"({self.seconds['dense'] * 1e3:.3f} ms dense, {self.seconds['sparse'] * 1e3:.3f} ms sparse, "
                "median of interleaved runs)"
            )
        for choice in self.layers.values():
            if choice.kernel == "dense":
                lines.append(f"  {choice.name or '<root>'}: {choice.describe()}")
        return lines


def _example_batch(example_inputs: Any) -> int | None:
    tensor = example_inputs
    if isinstance(example_inputs, dict):
        tensor = next(iter(example_inputs.values()), None)
    elif isinstance(example_inputs, (tuple, list)):
        tensor = example_inputs[0] if example_inputs else None
    return int(tensor.shape[0]) if isinstance(tensor, torch.Tensor) and tensor.ndim else None


def _layer_inputs(model: nn.Module, layers: dict[str, nn.Module], example_inputs: Any) -> tuple[dict, Any]:
    """Each layer's first input in one run of ``example_inputs`` (eval mode, no grad), and the output."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in layers.items():

        def hook(module, args, name=name):
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach()

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            output = call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen, output


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _leaves(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in _leaves(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in _leaves(value)]
    if hasattr(output, "to_tuple"):  # Hugging Face ModelOutput
        return _leaves(output.to_tuple())
    return []


def _check_outputs(reference: Any, result: Any, tolerance: float) -> None:
    for expected, actual in zip(_leaves(reference), _leaves(result)):
        if not expected.is_floating_point():
            continue
        scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-6)
        error = float((actual.float() - expected.float()).abs().max()) if expected.numel() else 0.0
        if error > tolerance * scale:
            raise RuntimeError(
                f"the sparse model's output differs from the dense one by {error:.3g} (largest output {scale:.3g}); "
                "this is a bug in prunekit.to_sparse, please report it with the model"
            )


def to_sparse(
    model: nn.Module,
    example_inputs: Any,
    *,
    kernel: str = "auto",
    exclude: Iterable[str] = (),
    inplace: bool = False,
    min_gain: float = 1.05,
    rounds: int = 21,
    clock: Callable[[], float] = time.perf_counter,
    check: bool = True,
    tolerance: float = 1e-4,
) -> nn.Module:
    """Return ``model`` with each Linear, Hugging Face ``Conv1D`` and Conv2d (groups 1, zero padding) that
    runs faster as a sparse matrix product replaced by a :class:`~prunekit.sparse.kernels.SparseLayer`.

    Args:
        model: a pruned model (its pruned weights are zeros; prunekit's pruner guarantees that).
        example_inputs: a tensor, tuple or dict the model accepts, at the batch size it will run at: each
            layer is measured on its own input from this batch.
        kernel: ``"auto"`` (measure dense and every kernel the weight allows, keep the fastest; a sparse
            kernel must beat dense by ``min_gain``, a ratio), or force one: ``"csr"`` (every eligible layer), ``"csr-linear"`` (Linear/Conv1D only),
            ``"bsr"`` (layers whose non-zeros fill tiles, see :func:`~prunekit.sparse.choose.block_size`),
            ``"semi"`` (2:4 layers on CUDA), ``"dense"`` (none).
        exclude: module names or ``fnmatch`` patterns (``"classifier"``, ``"encoder.layer.*.output.dense"``) of
            layers to leave dense, e.g. layers whose ``.weight`` the model reads directly.
        inplace: swap the layers of ``model`` itself instead of a deep copy.
        rounds: rounds of interleaved timing per layer (the median counts).
        clock: the timer, ``time.perf_counter`` (wall time); on a machine busy with other work and with
            ``torch.set_num_threads(1)``, ``time.thread_time`` counts only this thread's compute.
        check: run both models on ``example_inputs`` and raise if an output differs by more than
            ``tolerance`` × the largest absolute output.

    The returned model is for inference (see :mod:`prunekit.sparse.kernels`); ``model.prunekit_sparse``
    (a :class:`SparseReport`) records each layer's choice, and with ``"auto"`` the whole model's dense and
    sparse seconds. If the whole model is not faster by ``min_gain`` too, every layer is put back (with a
    warning). :func:`prunekit.summary` prints the kernels and gains; :func:`to_dense` undoes the swap.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
    if not isinstance(min_gain, (int, float)) or isinstance(min_gain, bool) or min_gain <= 0:
        raise ValueError(f"min_gain must be a positive ratio (1.05 = 5% faster), got {min_gain!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    if not callable(clock):
        raise TypeError(f"clock must be a function returning seconds, such as time.perf_counter, got {clock!r}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(exclude)
    if not all(isinstance(pattern, str) for pattern in exclude):
        raise TypeError(f"exclude takes module names or fnmatch patterns (strings), got {exclude!r}")
    names = {name for name, _ in model.named_modules()}
    unmatched = [p for p in exclude if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if unmatched:
        raise ValueError(f"exclude patterns {unmatched} match no module of the model")
    if any(isinstance(m, SparseLayer) for m in model.modules()):
        raise ValueError("the model already has sparse layers; call pk.to_dense(model) first")

    target = model if inplace else copy.deepcopy(model)
    layers = {
        name: m
        for name, m in target.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) or type(m).__name__ == "Conv1D"
    }
    report = SparseReport(batch=_example_batch(example_inputs))
    was_training = target.training
    target.eval()
    originals: dict[str, nn.Module] = {}
    try:
        inputs, reference = _layer_inputs(target, layers, example_inputs)
        for name, layer in layers.items():
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
                report.layers[name] = Choice(name, "dense", reason="excluded")
                continue
            module, choice = _decide(name, layer, inputs.get(name), kernel, min_gain, rounds, clock)
            report.layers[name] = choice
            if module is not None:
                originals[name] = layer
                _set_submodule(target, name, module)
        if check and originals:
            with torch.no_grad():
                try:
                    result = call_model(target, example_inputs)
                except Exception as error:
                    raise RuntimeError(
                        f"the model fails with sparse layers ({type(error).__name__}: {error}); it probably reads a "
                        "layer's .weight directly: leave that layer dense with exclude=[name]"
                    ) from error
                _check_outputs(reference, result, tolerance)
        if kernel == "auto" and originals:
            report.seconds = _model_seconds(target, originals, example_inputs, rounds, clock)
            if report.gain is not None and report.gain < min_gain:
                warnings.warn(
                    f"the whole model ran at ×{report.gain:.2f} the dense speed with sparse layers (below "
                    f"min_gain={min_gain:g}); keeping it dense",
                    stacklevel=2,
                )
                for name, layer in originals.items():
                    _set_submodule(target, name, layer)
                    report.layers[name] = Choice(
                        name, "dense", batch=report.batch, reason="whole model not faster sparse"
                    )
                originals.clear()
    except BaseException:
        for name, layer in originals.items():  # leave an in-place model exactly as it was
            _set_submodule(target, name, layer)
        target.train(was_training)
        raise
    target.train(was_training)
    target.prunekit_sparse = report
    return target


def _model_seconds(model: nn.Module, originals: dict[str, nn.Module], example_inputs: Any, rounds: int, clock) -> dict:
    """Median seconds per pass of the whole model, dense and sparse, interleaved: the layers are swapped
    before each timed run (a few attribute writes, negligible beside a pass)."""
    swapped = {name: model.get_submodule(name) for name in originals}

    def run(layers):
        for name, layer in layers.items():
            _set_submodule(model, name, layer)
        return call_model(model, example_inputs)

    try:
        with torch.no_grad():
            return interleaved_seconds(
                {"dense": lambda: run(originals), "sparse": lambda: run(swapped)}, rounds, clock=clock
            )
    finally:
        for name, layer in swapped.items():
            _set_submodule(model, name, layer)


def _decide(
    name: str, layer: nn.Module, inputs: torch.Tensor | None, kernel: str, min_gain: float, rounds: int, clock
) -> tuple[SparseLayer | None, Choice]:
    reason = unsupported(layer)
    if reason is not None:
        return None, Choice(name, "dense", reason=reason)
    if inputs is None:
        return None, Choice(name, "dense", reason="not run by the example inputs")
    batch = int(inputs.shape[0]) if inputs.ndim else 1
    if kernel == "dense":
        return None, Choice(name, "dense", batch=batch, reason="forced")
    if kernel == "auto":
        if not bool((weight_matrix(layer) == 0).any()):
            return None, Choice(name, "dense", batch=batch, reason="no zero weights")
        return choose(name, layer, inputs, rounds=rounds, min_gain=min_gain, clock=clock)
    allowed = candidates(layer)
    if kernel not in allowed:
        why = {
            "bsr": "its non-zeros do not fill tiles",
            "semi": "not a 2:4 weight on CUDA",
            "csr-linear": "Linear and Conv1D layers only",
        }.get(kernel, "")
        return None, Choice(name, "dense", batch=batch, reason=f"{kernel} does not fit: {why}")
    module = build(layer, kernel, allowed[kernel])
    module.measured_batch = batch
    return module, Choice(name, kernel, allowed[kernel], batch=batch)


def to_dense(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Undo :func:`to_sparse`: every sparse layer becomes its original layer again (same type, attributes,
    buffers and bit-identical weights, as Parameters); ``prunekit_sparse`` is removed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, SparseLayer):
        return model.to_dense()
    target = model if inplace else copy.deepcopy(model)
    for name, module in list(target.named_modules()):
        if isinstance(module, SparseLayer):
            _set_submodule(target, name, module.to_dense())
    if "prunekit_sparse" in target.__dict__:
        del target.__dict__["prunekit_sparse"]
    return target
