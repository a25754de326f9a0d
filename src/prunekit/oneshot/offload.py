"""Reading and writing the weights of modules that accelerate offloads (``device_map`` with ``"cpu"`` or
``"disk"``, ``cpu_offload``, ``disk_offload``), so such a model is pruned block by block without ever
being materialised whole.

An offloaded module's parameter sits on the ``meta`` device; its values live in its ``_hf_hook``'s
``weights_map``: a dict of CPU tensors (CPU offload; edited in place) or accelerate's
``OffloadedWeightsLoader`` over ``.dat`` files (disk offload; pruned weights are written back to their
file, the way accelerate wrote them).
"""

from __future__ import annotations

import torch
from torch import nn


def _offload_source(module: nn.Module, name: str):
    hook = getattr(module, "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    if weights_map is None:
        raise RuntimeError(
            f"the {name} of {type(module).__name__} is on the meta device and no accelerate offload map holds it"
        )
    return weights_map


def read_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The values of ``module.<name>``, wherever they are kept."""
    param = getattr(module, name)
    if param.device.type != "meta":
        return param.data
    return _offload_source(module, name)[name]


@torch.no_grad()
def write_weight(module: nn.Module, values: torch.Tensor, name: str = "weight") -> None:
    """Store new values for ``module.<name>`` where they are kept (on the module, in an offloaded dict
    of CPU tensors, or in the ``.dat`` file of a disk-offloaded weight)."""
    param = getattr(module, name)
    if param.device.type != "meta":
        param.data.copy_(values.to(param.device, param.dtype))
        return
    weights_map = _offload_source(module, name)
    dataset = getattr(weights_map, "dataset", None)
    key = f"{getattr(weights_map, 'prefix', '')}{name}"
    index = getattr(dataset, "index", None)
    if dataset is None or key in getattr(dataset, "state_dict", {}) or index is None or key not in index:
        weights_map[name].copy_(values.to(weights_map[name].dtype))  # a CPU tensor held by the hook
        return
    from accelerate.utils import offload_weight

    folder = getattr(dataset, "save_folder", None)
    if folder is None:
        raise RuntimeError(
            f"{key} is read from a checkpoint file and there is no offload folder to write the pruned weight to; "
            "dispatch the model with offload_folder= (accelerate's disk offload)"
        )
    dtype = getattr(torch, index[key]["dtype"]) if "dtype" in index[key] else values.dtype
    entry = index[key]
    entry.pop("safetensors_file", None)
    entry.pop("weight_name", None)
    offload_weight(values.detach().to("cpu", dtype).contiguous(), key, folder, index=index)
