"""The models a command line names: ``MODULE:FACTORY``, a file saved with :func:`prunekit.save_pruned`
(rebuilt with ``--factory``), or a Hugging Face folder (a ``config.json`` beside the weights).

Every mistake raises :class:`UsageError` with a one-line message.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class UsageError(Exception):
    """A mistake of the user's; reported as one line on stderr, exit status 2."""


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


@dataclass
class LoadedModel:
    """A model and where it came from: ``kind`` is ``"factory"``, ``"saved"`` or ``"huggingface"``."""

    model: nn.Module
    kind: str
    source: str
    folder: Path | None = None  # the Hugging Face folder (its tokenizer is read from there)


def load_factory(spec: str) -> Any:
    """Resolve ``"package.module:attribute"`` (the attribute may be dotted) to the object it names.

    The current directory is importable, as with ``python -m``.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"expected MODULE:FACTORY, e.g. torchvision.models:resnet18, got {spec!r}")
    added = False
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
        added = True
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise UsageError(f"cannot import {module_name!r}: no module named {err.name!r}") from None
        raise UsageError(f"importing {module_name!r} failed: {one_line(err)}") from None
    except Exception as err:  # the module itself raised (syntax error, missing dependency, ...)
        raise UsageError(f"importing {module_name!r} failed: {one_line(err)}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    found = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return found


def build_from_factory(spec: str) -> nn.Module:
    """The model ``MODULE:FACTORY`` names: ``FACTORY()``, or the object itself if it is a module."""
    factory = load_factory(spec)
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise UsageError(f"{spec} is a {type(factory).__name__}, not a callable that returns a model")
    try:
        model = factory()
    except Exception as err:
        raise UsageError(f"{spec}() failed: {one_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_model(spec: str, factory: str | None = None) -> LoadedModel:
    """The model ``spec`` names (see the module docstring); ``factory`` builds the architecture of a
    saved pruned file."""
    path = Path(spec)
    if path.is_dir():
        if factory is not None:
            raise UsageError("--factory is for files saved with pk.save_pruned, not Hugging Face folders")
        return LoadedModel(_load_huggingface(path), "huggingface", spec, path)
    if path.is_file():
        if factory is None:
            raise UsageError(
                f"{spec} is a saved model: say which architecture to rebuild it into with --factory MODULE:FACTORY"
            )
        from ..saving import load_pruned

        model = build_from_factory(factory)
        try:
            load_pruned(model, path)
        except Exception as err:
            raise UsageError(f"cannot load {spec} into {factory}(): {one_line(err)}") from None
        return LoadedModel(model, "saved", spec)
    if ":" in spec and os.sep not in spec.partition(":")[0]:
        if factory is not None:
            raise UsageError("--factory is for files saved with pk.save_pruned; MODEL already is MODULE:FACTORY")
        return LoadedModel(build_from_factory(spec), "factory", spec)
    raise UsageError(
        "expected MODULE:FACTORY (e.g. torchvision.models:resnet18), a file saved with pk.save_pruned (with "
        f"--factory) or a Hugging Face folder, got {spec!r}, which is none of them"
    )


def _load_huggingface(folder: Path) -> nn.Module:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{folder} is a folder without config.json, so not a Hugging Face model")
    try:
        import transformers
    except ImportError:
        raise UsageError("reading a Hugging Face folder needs transformers: pip install transformers") from None
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {config_file}: {one_line(err)}") from None
    model_class = getattr(transformers, architectures[0], None) if architectures else transformers.AutoModel
    if model_class is None:
        raise UsageError(f"{config_file} names the architecture {architectures[0]!r}, which transformers does not have")
    from ..hf import from_pretrained

    try:
        return from_pretrained(model_class, folder)
    except Exception as err:
        raise UsageError(f"cannot load the Hugging Face model in {folder}: {one_line(err)}") from None


def example_inputs_for(loaded: LoadedModel, shape: tuple[int, ...] | None, calibration: list | None) -> Any:
    """What to run the model on (for MACs and structured tracing): a random tensor of ``shape``, else
    the first calibration batch, else a Hugging Face model's own ``dummy_inputs``; None if none of them."""
    if shape is not None:
        param = next(loaded.model.parameters(), None)
        return torch.randn(shape, device=param.device if param is not None else None)
    if calibration:
        return calibration[0]
    dummy = getattr(loaded.model, "dummy_inputs", None) if loaded.kind == "huggingface" else None
    return dict(dummy) if isinstance(dummy, dict) else None
