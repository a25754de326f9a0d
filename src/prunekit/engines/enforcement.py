"""Mask enforcement: the masks live on the model (bit-packed buffers, :mod:`prunekit.core.masks`);
this part installs new ones, keeps pruned weights at zero, and hooks optimizers so nothing comes back.

The masks are applied by multiplying each weight with its bool mask's bytes read as uint8 (a view, no
copy), one ``torch._foreach_mul_`` over all masked tensors: on a small network the Python of a loop
over layers costs as much as the products themselves. Several optimizers may be attached (a model
trained by two, a fresh optimizer per pruning round); each re-applies the masks right after its
``step()`` and has its state (momentum, Adam moments) zeroed at pruned entries whenever masks change.
A parameter sharded by FSDP2 is masked through its local shard (and so are its gradient and
optimizer state), with the mask of the rows this rank holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..core import masks as mask_store
from ..core.sharding import local_tensor
from .update import MaskKey, MaskUpdate, ScratchBuffers


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside a framework's wrapper: Accelerate's ``AcceleratedOptimizer``
    (itself an Optimizer subclass, whose own hook tables are never set up) keeps it as ``.optimizer``,
    Lightning's ``LightningOptimizer`` as ``._optimizer``. Wrappers of wrappers are unwrapped too."""
    for _ in range(8):
        inner = next(
            (
                found
                for found in (getattr(optimizer, "optimizer", None), getattr(optimizer, "_optimizer", None))
                if found is not None and found is not optimizer and hasattr(found, "param_groups")
            ),
            None,
        )
        if inner is None:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}")
    return optimizer


class MaskEnforcer:
    """Holds the masks of ``maskable`` (``[(module, parameter name, full name)]``) and enforces them.

    ``mask_gradients``: also zero the gradients of pruned weights before each attached optimizer's
    step, so its state stays zero at pruned entries at all times.
    """

    def __init__(self, maskable: list[MaskKey], mask_gradients: bool = False):
        self.maskable = maskable
        self.mask_gradients_before_step = bool(mask_gradients)
        self._keep_cache: dict[str, torch.Tensor] = {}
        self._enforced: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        #: The parameters behind ``_enforced`` (a sharded one is enforced through its local view), and their ids.
        self._enforced_params: list[torch.Tensor] = []
        self._enforced_ids: set[int] = set()
        self._optimizers: dict[int, tuple[torch.optim.Optimizer, list[Any]]] = {}
        #: True once an attached optimizer has stepped since the last :meth:`after_training_step`.
        self._stepped_since = False
        self._covered: bool | None = None

    # ------------------------------------------------------------------ reading masks

    def keep(self, module: nn.Module, param_name: str, full_name: str) -> torch.Tensor | None:
        """The bool keep-mask, unpacked once and cached while masks are being enforced."""
        keep = self._keep_cache.get(full_name)
        if keep is None:
            keep = mask_store.get_mask(module, param_name)
            if keep is not None:
                self._keep_cache[full_name] = keep
        return keep

    def masks(self) -> dict[str, torch.Tensor]:
        """``{full name: bool keep-mask}`` of every masked tensor (fresh copies)."""
        found = {}
        for module, param_name, full_name in self.maskable:
            keep = mask_store.get_mask(module, param_name)
            if keep is not None:
                found[full_name] = keep
        return found

    def _enforced_masks(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self._enforced is None:
            params, byte_masks, whole = [], [], []
            for module, param_name, full_name in self.maskable:
                keep = self.keep(module, param_name, full_name)
                if keep is not None:
                    param = getattr(module, param_name)
                    whole.append(param)
                    params.append(local_tensor(param))
                    byte_masks.append(keep.view(torch.uint8))
            self._enforced, self._enforced_params = (params, byte_masks), whole
            self._enforced_ids = {id(param) for param in whole}
            self._covered = None
        return self._enforced

    # ------------------------------------------------------------------ applying

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned entry in place."""
        params, byte_masks = self._enforced_masks()
        if params:
            torch._foreach_mul_(params, byte_masks)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        byte_masks = self._enforced_masks()[1]
        for param, byte_mask in zip(self._enforced_params, byte_masks):  # the parameters, not their shards
            if param.grad is not None:
                local_tensor(param.grad).mul_(byte_mask)

    def after_training_step(self) -> None:
        """What :meth:`prunekit.Pruner.step` does first: re-apply the masks, unless every masked tensor
        belongs to an attached optimizer and one of them has just stepped (its hook applied them)."""
        if not (self._stepped_since and self._all_covered()):
            self.apply()
        self._stepped_since = False

    def _all_covered(self) -> bool:
        if self._covered is None:
            owned = {
                id(p) for optimizer, _ in self._optimizers.values() for g in optimizer.param_groups for p in g["params"]
            }
            self._enforced_masks()
            self._covered = all(i in owned for i in self._enforced_ids)
        return self._covered

    @torch.no_grad()
    def install(self, update: MaskUpdate, cache: bool) -> None:
        """Store the update's masks on the model and zero what they prune. ``cache`` keeps the bool
        masks unpacked for fast enforcement (training); otherwise each is unpacked into one reused buffer."""
        self._enforced = None
        largest = max((8 * p.numel() for p in update.packed.values()), default=0)
        buffer = None if cache or largest < 1 << 16 else torch.empty(largest, dtype=torch.uint8)
        for key, packed in update.packed.items():
            module, param_name, full_name = key
            param = getattr(module, param_name)
            separable = update.separable.get(key)
            if separable is not None and not cache:
                mask_store.store_packed(module, param_name, packed)
                separable.zero(param.data)
                self._keep_cache.pop(full_name, None)
                continue
            keep = update.unpacked.get(key) if separable is None else separable.dense()
            if keep is None or keep.device != param.device:
                out = buffer if buffer is not None and buffer.device == packed.device else None
                keep = mask_store.unpack_mask(packed, param.shape, out=out)
            mask_store.set_mask(module, param_name, keep, packed)
            self._keep_cache.pop(full_name, None)
            if cache:
                self._keep_cache[full_name] = keep
        self._apply_magnitude_cuts(update.magnitude_cuts, cache)

    def _apply_magnitude_cuts(self, magnitude_cuts: dict, cache: bool) -> None:
        """Prune the weights whose new mask is "|w| > t, plus the protected units": zero them in one
        fused pass, then pack the mask from the result."""
        largest = max((getattr(m, p).numel() for m, p, _ in magnitude_cuts), default=0)
        buffers = ScratchBuffers(largest if largest >= 1 << 16 else 0)
        for (module, param_name, full_name), (threshold, protected) in magnitude_cuts.items():
            param = getattr(module, param_name)
            packed, keep = mask_store.prune_magnitude(
                param.detach(), threshold, protected, buffers.flags, buffers.words
            )
            mask_store.store_packed(module, param_name, packed)
            self._keep_cache.pop(full_name, None)
            if cache:
                self._keep_cache[full_name] = keep.clone().view(param.shape)

    @property
    def caching(self) -> bool:
        return bool(self._keep_cache)

    def forget(self) -> None:
        """Drop the cached masks (after the stored masks were replaced)."""
        self._keep_cache.clear()
        self._enforced = None

    def remove_all(self) -> None:
        """Forget every mask; the weights keep their zeros."""
        for module, param_name, _ in self.maskable:
            mask_store.remove_mask(module, param_name)
        self.forget()

    # ------------------------------------------------------------------ optimizers

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [optimizer for optimizer, _ in self._optimizers.values()]

    def attach(self, optimizer: Any) -> torch.optim.Optimizer:
        """Hook ``optimizer`` (or the optimizer a framework wraps); attaching one twice does nothing."""
        inner = unwrap_optimizer(optimizer)
        if id(inner) in self._optimizers:
            return inner
        handles = []
        try:  # all hooks or none: a failed attach leaves the optimizer as it was
            if self.mask_gradients_before_step:
                handles.append(inner.register_step_pre_hook(self._before_optimizer_step))
            handles.append(inner.register_step_post_hook(self.after_optimizer_step))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        self._optimizers[id(inner)] = (inner, handles)
        self._covered = None
        self.clear_optimizer_state([inner])
        return inner

    def detach(self, optimizer: Any) -> None:
        """Unhook an attached optimizer; raises ``ValueError`` if it is not attached."""
        inner = unwrap_optimizer(optimizer)
        entry = self._optimizers.pop(id(inner), None)
        if entry is None:
            raise ValueError("this optimizer is not attached to the pruner (attach it with pruner.attach_optimizer)")
        for handle in entry[1]:
            handle.remove()
        self._covered = None

    def detach_all(self) -> None:
        for optimizer in self.optimizers:
            self.detach(optimizer)

    def after_optimizer_step(self, *_: Any) -> None:
        """What an attached optimizer's post-step hook does: re-apply the masks, and note that they are
        fresh for :meth:`after_training_step`."""
        self.apply()
        self._stepped_since = True

    def _before_optimizer_step(self, optimizer, args, kwargs):
        # torch passes step's own arguments, the optimizer first: (optimizer, closure?).
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.mask_gradients()
            return None

        # Optimizers such as LBFGS compute gradients inside step(), through the closure.
        def masked_closure():
            loss = closure()
            self.mask_gradients()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": masked_closure}
        return (args[0], masked_closure, *args[2:]), kwargs

    @torch.no_grad()
    def clear_optimizer_state(self, optimizers: Iterable[torch.optim.Optimizer] | None = None) -> None:
        """Zero the attached optimizers' state tensors (momentum, moments) at pruned entries."""
        for optimizer in self.optimizers if optimizers is None else optimizers:
            for module, param_name, full_name in self.maskable:
                param = getattr(module, param_name)
                state = optimizer.state.get(param)
                keep = self.keep(module, param_name, full_name) if state else None
                if keep is None:
                    continue
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        mask_store.zero_pruned(local_tensor(value), keep)

    def reset_optimizer_state(self) -> None:
        """Clear the attached optimizers' whole state (after a lottery-ticket rewind)."""
        for optimizer in self.optimizers:
            optimizer.state.clear()
