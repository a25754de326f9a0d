"""Finding a model's repeated blocks and running them one at a time on captured inputs.

Sequential pruning (as SparseGPT does it, Frantar & Alistarh 2023, §4): the inputs of the first block are
captured once; each block is then pruned from its own inputs and its pruned outputs become the next
block's inputs, so later blocks see (and compensate for) the errors of earlier ones. Only one block runs at
a time, so the extra memory is the activations plus one block's statistics, never a second model.

With ``sequential=False`` (:func:`prunekit.oneshot.prune_with_calibration`) each block's statistics and
its (dense) outputs come from the same pass, before the block is pruned: the statistics are those of the
dense model's activations, at one forward pass per block.

Blocks are found as the ``nn.ModuleList`` stacks Hugging Face models run (``model.layers`` in
LLaMA/Mistral/Qwen2, ``model.decoder.layers`` in OPT, ``transformer.h`` in GPT-2, ``encoder.layer`` in
BERT/ViT, ``encoder.block``/``decoder.block`` in T5), wherever they sit in the model (so a
sentence-transformers model's inner BERT is found too); any other model names them with
``blocks="path.to.modulelist"`` (or a list of paths, run in that order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .calibration import BlockInputs, to_device

#: Last names of the ModuleLists that hold the blocks of Hugging Face transformers.
BLOCK_LIST_NAMES = ("layers", "layer", "h", "block", "blocks")


def _contains_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" for m in module.modules())


def _is_stack(module: nn.Module) -> bool:
    children = list(module.children())
    return (
        isinstance(module, nn.ModuleList)
        and len(children) > 0
        and len({type(c) for c in children}) == 1
        and all(_contains_linear(c) for c in children)
    )


def find_blocks(model: nn.Module, blocks: str | Sequence[str] | None = None) -> list[tuple[str, nn.ModuleList]]:
    """The model's block stacks as ``[(path, ModuleList)]`` in the order the model runs them.

    With ``blocks`` (a path such as ``"model.layers"``, or a list of paths), those; without, every
    ModuleList named like a Hugging Face block stack whose children share one class and contain Linear
    layers (the outermost one when they nest). Raises ``ValueError`` saying how to name them.
    """
    if blocks is not None:
        paths = [blocks] if isinstance(blocks, str) else list(blocks)
        found = []
        for path in paths:
            if not isinstance(path, str):
                raise TypeError(f"blocks takes the path of an nn.ModuleList (a str) or a list of them, got {path!r}")
            try:
                stack = model.get_submodule(path)
            except AttributeError:
                raise ValueError(
                    f"blocks={path!r}: the model has no submodule of that name; pass the dotted path of the "
                    "nn.ModuleList (or nn.Sequential) holding its repeated blocks, e.g. blocks='model.layers'"
                ) from None
            if not isinstance(stack, (nn.ModuleList, nn.Sequential)) or len(stack) == 0:
                raise ValueError(
                    f"blocks={path!r} is a {type(stack).__name__}, not a non-empty nn.ModuleList or nn.Sequential "
                    "of blocks"
                )
            found.append((path, stack))
        return found
    found = []
    for name, module in model.named_modules():
        if name.split(".")[-1] not in BLOCK_LIST_NAMES or not _is_stack(module):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, module))
    if not found:
        raise ValueError(
            f"could not find the repeated blocks of this {type(model).__name__} (looked for an nn.ModuleList "
            f"named {', '.join(BLOCK_LIST_NAMES)}); name them with blocks='path.to.modulelist', e.g. "
            "blocks='model.layers' (a list of paths for several stacks)"
        )
    return found


def block_device(block: nn.Module) -> torch.device | None:
    """Where a block computes: the device of its first parameter that is not on ``meta`` (None if unknown)."""
    hook = getattr(block, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, torch.device) else device
    for param in block.parameters():
        if param.device.type != "meta":
            return param.device
    return None


def hidden_of(output: Any) -> torch.Tensor:
    """A block's hidden states: the output itself, or the first entry of a tuple/list/ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "to_tuple"):
        return output.to_tuple()[0]
    raise TypeError(f"cannot read the hidden states from a block output of type {type(output).__name__}")


def _carry(args: tuple, output: Any) -> tuple:
    """T5 blocks return (hidden, self-attention bias, cross-attention bias) and the stack passes the first
    block's biases to the later ones as positional arguments 2 and 5; other blocks get the same extras."""
    if isinstance(output, tuple) and len(output) == 3 and len(args) >= 6:
        args = list(args)
        args[2], args[5] = output[1], output[2]
        return tuple(args)
    return args


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, index: int, storage: str | None) -> tuple[tuple, Any]:
    """Call ``block`` on the inputs of calibration batch ``index``; return (its positional inputs for the
    next block, the raw output). ``storage`` is where captured tensors live (None: where computed)."""
    device = block_device(block)
    args = to_device(inputs.args[index], device) if storage is not None else inputs.args[index]
    kwargs = to_device(inputs.kwargs[index], device) if storage is not None else inputs.kwargs[index]
    if args:
        output = block(*args, **kwargs)
    else:  # the hidden states came as a keyword
        output = block(**kwargs)
    return _carry(inputs.args[index], output), output


def next_inputs(
    block: nn.Module, inputs: BlockInputs, storage: str | None, before: Callable[[int], None] | None = None
) -> BlockInputs:
    """The next block's inputs: this block's outputs in place of the hidden states, other inputs kept.
    ``before(index)`` is called before the block runs on batch ``index`` (to set a recorder's token mask)."""
    result = BlockInputs(masks=inputs.masks)
    for index in range(len(inputs.args)):
        if before is not None:
            before(index)
        args, output = run_block(block, inputs, index, storage)
        hidden = to_device(hidden_of(output), storage)
        kwargs = inputs.kwargs[index]
        if args:
            result.args.append((hidden, *to_device(args[1:], storage)))
            result.kwargs.append(kwargs)
        else:
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            result.args.append(())
            result.kwargs.append({**kwargs, key: hidden})
    return result
