"""Hugging Face transformers: keep a compacted model's config true, and load compacted checkpoints.

A transformers ``PreTrainedModel`` is rebuilt from its ``config`` by ``from_pretrained``, so after
:func:`prunekit.compact` the config has to describe the smaller model. :func:`record_in_config` (which
``compact`` and ``load_pruned`` call) measures the compacted model and writes these fields where the
config has them:

- ``num_attention_heads`` (GPT-2 ``n_head``, T5 ``num_heads``): query heads per attention module;
- ``num_key_value_heads``: key/value heads per attention module (grouped-query attention, LLaMA);
- ``head_dim`` (T5 ``d_kv``): the size of one head, which pruning never changes, but which models such
  as LLaMA and ViT would otherwise derive as ``hidden_size // num_attention_heads`` (written only with a
  new head count; added where the config has no such field, as ViT reads it when present);
- ``intermediate_size`` (GPT-2 ``n_inner``, T5 ``d_ff``): the hidden width of the feed-forward blocks;
- ``hidden_size`` (GPT-2 ``n_embd``, T5 ``d_model``): the residual stream width, which changes only with
  ``prune_outputs=True``.

A config field holds one number for every layer, so the fields are written only when every layer ended
up the same size (``scope="local"`` prunes every layer alike) *and* the model class, built from the
updated config, has exactly the compacted model's tensor shapes and head counts (checked on the meta
device, so it costs no memory). Then plain ``save_pretrained`` / ``from_pretrained`` round-trip the
model. Otherwise (``scope="global"`` gives each layer its own size; BERT derives the head size from
``hidden_size / num_attention_heads`` and so cannot describe removed heads) the fields keep their
original values, plain ``from_pretrained`` refuses the checkpoint (transformers raises on the
mismatched weight shapes unless given ``ignore_mismatched_sizes=True``, which would re-initialise
them), and :func:`from_pretrained` is the way to load it.

Either way the config carries a ``prunekit`` entry, which ``save_pretrained`` writes to config.json::

    "prunekit": {
        "format": "prunekit-hf/1",
        "config_describes_model": true,    # the fields above describe the model (uniform sizes)
        "original": {"num_attention_heads": 4, "intermediate_size": 64},  # values before any pruning
        "added": [],                       # fields the original config did not have (ViT: head_dim)
        "layers": {"attention_heads": {"model.layers.0.self_attn": 2, ...}, "key_value_heads": {...},
                   "head_dim": {...}, "mlp_width": {"model.layers.0.mlp.up_proj": 32, ...},
                   "hidden_size": 32},     # what each layer has now
        "plan": {"format": "prunekit-plan/1", "encoding": "prunekit-kept-bits/1",
                 "index_sets": ["/w8=", ...],                   # each distinct list of kept indices, once
                 "kept": {"model.layers.0.mlp.up_proj.weight": {"0": 0}, ...}}  # tensor → dim → set
    }

The plan says which indices of every sliced tensor were kept (see :mod:`prunekit.compact`). In
config.json each distinct list of kept indices is written once (the tensors cut by one dependency group
share it), as a bitmap in base64: bit i of the bytes (least significant first) is set when index i was
kept. A compacted BERT-base's plan is then a few kilobytes instead of half a megabyte of indices. transformers is never imported here: a model is recognised as a
``PreTrainedModel`` only when transformers is already loaded, so prunekit does not require it.
"""

from __future__ import annotations

import base64
import copy
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import plans as compaction

CONFIG_ENTRY = "prunekit"
ENTRY_FORMAT = "prunekit-hf/1"
PLAN_ENCODING = "prunekit-kept-bits/1"

# Config fields by what they describe, in order of preference: the first one the config has is the one
# written. transformers' attribute_map makes aliases (GPT-2's n_head, T5's num_heads for
# num_attention_heads) read and write the same field.
_HEADS_FIELDS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
_KV_HEADS_FIELDS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads")
_HEAD_DIM_FIELDS = ("head_dim", "d_kv")
_MLP_WIDTH_FIELDS = ("intermediate_size", "n_inner", "d_ff", "ffn_dim")
_HIDDEN_FIELDS = ("hidden_size", "n_embd", "d_model")
# Names of the layers that widen the residual stream into a feed-forward block's hidden neurons: BERT and
# ViT (intermediate.dense), LLaMA-style gated MLPs (gate_proj, up_proj), GPT-2 (c_fc), T5 (wi, wi_0,
# wi_1), OPT/CLIP/ViT (fc1), GPT-NeoX/Falcon (dense_h_to_4h), DistilBERT (lin1).
_MLP_INPUT_SUFFIXES = (
    "intermediate.dense", "gate_proj", "up_proj", "c_fc", "wi", "wi_0", "wi_1", "fc1", "dense_h_to_4h", "lin1",
)  # fmt: skip


def is_pretrained_model(model: Any) -> bool:
    """True for a transformers ``PreTrainedModel`` (False, without importing transformers, when no code
    has imported it: then ``model`` cannot be one)."""
    transformers = sys.modules.get("transformers")
    pretrained = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    return pretrained is not None and isinstance(model, pretrained)


def _first_field(config: Any, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if hasattr(config, name)), None)


def saved_plan(model: nn.Module) -> dict[str, Any] | None:
    """The plan recorded in a Hugging Face model's config (a compacted checkpoint loaded with plain
    ``from_pretrained`` has the plan only there), or None."""
    entry = _entry(getattr(model, "config", None)) if is_pretrained_model(model) else None
    return decode_plan(entry["plan"]) if entry else None


def encode_plan(plan: Mapping[str, Any]) -> dict[str, Any]:
    """The plan as config.json stores it: each distinct kept-index list once, as a base64 bitmap (a list
    that is not increasing, which compaction never makes, stays a list)."""
    sets: list[Any] = []
    found: dict[tuple[int, ...], int] = {}
    kept: dict[str, dict[str, int]] = {}
    for name, dims in plan.get("kept", {}).items():
        for dim, indices in dims.items():
            key = tuple(int(i) for i in indices)
            if key not in found:
                found[key] = len(sets)
                sets.append(_bitmap(key) if all(a < b for a, b in zip(key, key[1:])) else list(key))
            kept.setdefault(name, {})[str(dim)] = found[key]
    return {
        "format": plan.get("format", compaction.PLAN_FORMAT),
        "encoding": PLAN_ENCODING,
        "index_sets": sets,
        "kept": kept,
    }


def decode_plan(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The plan :func:`encode_plan` stored (a plan stored with plain index lists is returned as it is)."""
    if stored.get("encoding") is None:
        return copy.deepcopy(dict(stored))
    if stored["encoding"] != PLAN_ENCODING:
        raise ValueError(f"unknown plan encoding {stored['encoding']!r} (this prunekit reads {PLAN_ENCODING!r})")
    sets = [_indices(entry) for entry in stored["index_sets"]]
    kept = {name: {dim: list(sets[i]) for dim, i in dims.items()} for name, dims in stored["kept"].items()}
    return {"format": stored.get("format", compaction.PLAN_FORMAT), "kept": kept}


def _bitmap(indices: tuple[int, ...]) -> str:
    bits = bytearray((indices[-1] + 8) // 8 if indices else 0)
    for index in indices:
        bits[index >> 3] |= 1 << (index & 7)
    return base64.b64encode(bytes(bits)).decode("ascii")


def _indices(entry: Any) -> list[int]:
    if isinstance(entry, list):
        return [int(i) for i in entry]
    bits = base64.b64decode(entry)
    return [8 * byte_index + bit for byte_index, byte in enumerate(bits) for bit in range(8) if byte >> bit & 1]


def _entry(config: Any) -> dict[str, Any] | None:
    entry = getattr(config, CONFIG_ENTRY, None)
    if entry is None:
        return None
    if not isinstance(entry, Mapping) or entry.get("format") != ENTRY_FORMAT:
        raise ValueError(
            f"the config's {CONFIG_ENTRY!r} entry is not one prunekit wrote (expected format {ENTRY_FORMAT!r}); "
            "remove it or rename it"
        )
    return dict(entry)


def layer_sizes(model: nn.Module) -> dict[str, Any]:
    """Per-module sizes of a (compacted) transformer: ``attention_heads``, ``key_value_heads`` and
    ``head_dim`` per attention module, ``mlp_width`` per feed-forward input layer, and ``hidden_size``
    (the width of the input embedding; None where it cannot be read)."""
    sizes: dict[str, Any] = {"attention_heads": {}, "key_value_heads": {}, "head_dim": {}, "mlp_width": {}}
    for name, module in model.named_modules():
        counts = compaction.attention_head_counts(module)
        if counts is not None:
            heads, kv_heads, head_dim = counts
            sizes["attention_heads"][name] = heads
            sizes["head_dim"][name] = head_dim
            if kv_heads is not None:
                sizes["key_value_heads"][name] = kv_heads
        elif any(name == suffix or name.endswith("." + suffix) for suffix in _MLP_INPUT_SUFFIXES):
            width = compaction.projection_width(module)
            if width:
                sizes["mlp_width"][name] = width
    sizes["hidden_size"] = _hidden_size(model)
    return sizes


def _hidden_size(model: nn.Module) -> int | None:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get_embeddings() if callable(get_embeddings) else None
    except (NotImplementedError, AttributeError):
        return None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.weight.shape[1]
    projection = getattr(embeddings, "projection", None)  # ViT-style patch embeddings
    if isinstance(projection, nn.modules.conv._ConvNd):
        return projection.weight.shape[0]
    return None


def _uniform(values: Mapping[str, int]) -> int | None:
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else None


def _candidate_fields(config: Any, sizes: Mapping[str, Any]) -> dict[str, Any]:
    """Config field values that describe ``sizes``, for the sizes that are the same in every layer."""
    fields: dict[str, Any] = {}

    def propose(names: tuple[str, ...], value: int | None) -> None:
        field = _first_field(config, names)
        if field is not None and value is not None:
            fields[field] = value

    heads = _uniform(sizes["attention_heads"])
    propose(_HEADS_FIELDS, heads)
    head_dim = _uniform(sizes["head_dim"])
    if heads is not None and head_dim is not None:
        # Pruning keeps the head size; models that derive it from hidden_size / num_attention_heads need
        # it written out, as a new ``head_dim`` field where the config has none (ViT reads one if present).
        fields[_first_field(config, _HEAD_DIM_FIELDS) or "head_dim"] = head_dim
    kv_field = _first_field(config, _KV_HEADS_FIELDS)
    if kv_field is not None and getattr(config, kv_field) is not None:
        propose(_KV_HEADS_FIELDS, _uniform(sizes["key_value_heads"]))
    propose(_MLP_WIDTH_FIELDS, _uniform(sizes["mlp_width"]))
    propose(_HIDDEN_FIELDS, sizes.get("hidden_size"))
    return fields


def _changes(config: Any, candidates: dict[str, Any], original: Mapping[str, Any], added: list[str]) -> dict[str, Any]:
    """The candidate fields that change the config, or were changed by an earlier compaction."""

    def unchanged(field: str) -> bool:
        touched = field in original or field in added
        return not touched and hasattr(config, field) and getattr(config, field) == candidates[field]

    changes = {field: value for field, value in candidates.items() if not unchanged(field)}
    heads_field = _first_field(config, _HEADS_FIELDS)
    if heads_field not in changes:  # the head size needs writing out only for a new head count
        changes = {f: v for f, v in changes.items() if f not in _HEAD_DIM_FIELDS or f in original or f in added}
    return changes


def _describes(config: Any, model: nn.Module) -> bool:
    """Does ``type(model)(config)`` have exactly ``model``'s tensor names, shapes and head counts? Built on
    the meta device: no memory, no initialisation cost."""
    try:
        with torch.device("meta"):
            reference = type(model)(copy.deepcopy(config))
    except Exception:  # the config is inconsistent for this class (e.g. BERT: hidden size % heads != 0)
        return False
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    actual = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if expected != actual:
        return False
    modules = dict(model.named_modules())
    return all(
        compaction.attention_head_counts(module) == compaction.attention_head_counts(modules[name])
        for name, module in reference.named_modules()
        if name in modules and compaction.attention_head_counts(module) is not None
    )


def _restore(config: Any, original: Mapping[str, Any], added: list[str]) -> None:
    """Put the fields recorded before pruning back: ``original`` values, and no ``added`` fields."""
    for field, value in original.items():
        setattr(config, field, value)
    for field in added:
        if field in vars(config):
            delattr(config, field)


def record_in_config(model: nn.Module, plan: Mapping[str, Any]) -> None:
    """Make a compacted Hugging Face model's ``config`` describe it, and record the plan there (see the
    module docstring: which fields, when they are written, and the ``prunekit`` entry). Does nothing for
    other models, or when nothing was ever removed."""
    if not is_pretrained_model(model) or getattr(model, "config", None) is None:
        return
    config = model.config
    entry = _entry(config)
    if entry is None and not plan.get("kept"):
        return
    # What the config said before the first compaction: kept from an earlier entry, read from the config
    # otherwise. ``added`` lists fields the original config did not have (ViT reads ``head_dim`` when the
    # config has one, and derives it from hidden_size / num_attention_heads otherwise).
    original = dict(entry["original"]) if entry else {}
    added = list(entry.get("added", [])) if entry else []
    sizes = layer_sizes(model)
    candidates = _changes(config, _candidate_fields(config, sizes), original, added)
    for field in candidates:
        if field not in original and field not in added:
            if hasattr(config, field):
                original[field] = getattr(config, field)
            else:
                added.append(field)
    trial = copy.deepcopy(config)
    if CONFIG_ENTRY in vars(trial):
        delattr(trial, CONFIG_ENTRY)
    _restore(trial, original, added)
    for field, value in candidates.items():
        setattr(trial, field, value)
    describes = _describes(trial, model)
    _restore(config, original, added)
    if describes:
        for field, value in candidates.items():
            setattr(config, field, value)
    setattr(
        config,
        CONFIG_ENTRY,
        {
            "format": ENTRY_FORMAT,
            "config_describes_model": describes,
            "original": original,
            "added": added,
            "layers": sizes,
            "plan": encode_plan(plan),
        },
    )


def from_pretrained(model_class: type, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a compacted model saved with ``save_pretrained``, whatever its layer sizes.

    ``model_class`` is the transformers class it was saved from (e.g. ``LlamaForCausalLM``); ``path`` and
    ``kwargs`` are what ``model_class.from_pretrained`` takes (``dtype``, ``device_map``, ...). The model
    is built at its original size from the config (with the sizes recorded before pruning in the config's
    ``prunekit`` entry), sliced by the recorded plan (:func:`prunekit.apply_plan`), and then loaded by
    transformers itself, which renames legacy checkpoint keys, ties weights, and raises on any weight
    whose shape differs. A checkpoint without a ``prunekit`` entry was not compacted and is loaded with
    plain ``model_class.from_pretrained``. Returns the model in eval mode, as ``from_pretrained`` does,
    with its config describing it (see :func:`record_in_config`).

    Needed when the layers were pruned to different sizes (``scope="global"``), or when the config cannot
    describe the compacted model (BERT after removing heads): plain ``from_pretrained`` then raises on the
    mismatched shapes. For uniform compactions both work.
    """
    config_class = getattr(model_class, "config_class", None)
    if not isinstance(model_class, type) or config_class is None or not hasattr(model_class, "from_pretrained"):
        raise TypeError(f"expected a transformers PreTrainedModel class (e.g. LlamaForCausalLM), got {model_class!r}")
    config = config_class.from_pretrained(path)
    entry = _entry(config)
    if entry is None:
        return model_class.from_pretrained(path, **kwargs)
    plan = entry.get("plan")
    if not isinstance(plan, Mapping) or plan.get("format") != compaction.PLAN_FORMAT:
        raise ValueError(
            f"the prunekit entry in {os.fspath(path)!r}/config.json has no valid plan "
            f"(expected format {compaction.PLAN_FORMAT!r}); was config.json edited?"
        )
    plan = decode_plan(plan)
    delattr(config, CONFIG_ENTRY)
    _restore(config, entry["original"], list(entry.get("added", [])))

    class Compacted(model_class):
        # transformers builds the model (on the meta device) with ``cls(config)``, then loads the weights
        # into it: slicing right after building makes the shapes those of the checkpoint.
        def __init__(self, *args: Any, **init_kwargs: Any) -> None:
            super().__init__(*args, **init_kwargs)
            compaction.apply_plan(self, plan)

    Compacted.__name__, Compacted.__qualname__ = model_class.__name__, model_class.__qualname__
    Compacted.__module__ = model_class.__module__
    model = Compacted.from_pretrained(path, config=config, **kwargs)
    model.__class__ = model_class  # the loaded model is a plain instance of the class it was saved from
    model.prunekit_plan = {"format": compaction.PLAN_FORMAT, "kept": plan["kept"]}
    record_in_config(model, model.prunekit_plan)
    return model.eval()


# Compaction reads earlier plans from, and records new ones in, a Hugging Face model's config.
compaction.register_plan_hooks(read=saved_plan, write=record_in_config)
