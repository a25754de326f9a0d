"""``prunekit prune MODEL --recipe r.yaml --out PATH``: prune a model once, as a recipe says, and save it.

MODEL is ``MODULE:FACTORY``, a file saved with :func:`prunekit.save_pruned` (with ``--factory``) or a
Hugging Face folder (:mod:`prunekit.commands.models`). ``--calibration`` gives the batches of criteria
that read activation statistics: a ``.pt`` file of one tensor (split into batches of the recipe's
``calibration.batch_size``) or of a list of batches, or a text file, tokenised with the Hugging Face
folder's tokenizer into ``calibration.samples`` sequences of ``calibration.sequence_length`` tokens.
With ``--compact`` the pruned channels are removed (structured recipes). The result is written with
``save_pretrained`` for a Hugging Face model (a folder) and with :func:`prunekit.save_pruned` otherwise;
then its summary is printed. Everything is checked before anything is written: on a mistake the command
prints one line, exits with status 2 and leaves ``--out`` absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .models import LoadedModel, UsageError, example_inputs_for, load_model, one_line

#: Errors of prunekit or of the user's inputs, reported as one line (anything else is a bug: a traceback).
USER_ERRORS = (ValueError, TypeError, KeyError, IndexError, RuntimeError, OSError)


def run_prune(args: Any) -> dict[str, Any]:
    """Do ``prunekit prune`` for parsed ``args``; returns the summary as a dict (after printing it)."""
    from ..recipes import load_recipe

    out = Path(args.out)
    if out.exists():
        raise UsageError(f"--out {out} exists; remove it or choose another path (nothing is overwritten)")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    try:
        recipe = load_recipe(args.recipe)
    except ImportError as err:
        raise UsageError(str(err)) from None
    except ValueError as err:  # RecipeError: says where and what
        raise UsageError(str(err).splitlines()[0]) from None
    arguments = recipe.pruner_arguments()
    schedule = arguments.get("schedule")
    if schedule is not None and getattr(schedule, "last_event", 0) != 0:
        raise UsageError(
            f"the recipe's schedule {schedule!r} prunes during training; prunekit prune prunes once, without "
            "training: drop the schedule (or use one_shot), or prune in training with a prunekit.integrations callback"
        )
    loaded = load_model(args.model, args.factory)
    calibration = read_calibration(args.calibration, loaded, recipe.calibration or {}) if args.calibration else None
    example_inputs = example_inputs_for(loaded, args.input_shape, calibration)
    model = _prune(loaded, arguments, calibration, example_inputs, args.compact)
    _write(model, loaded, out)
    return _report(model, example_inputs, args)


def _prune(loaded: LoadedModel, arguments: dict, calibration: list | None, example_inputs: Any, compact: bool):
    from ..compact import compact as compact_model
    from ..pruner import Pruner

    options = dict(arguments)
    sparsity = options.pop("sparsity", None)
    if calibration is not None:
        options["calibration"] = calibration
    if example_inputs is not None:
        options["example_inputs"] = example_inputs
    elif compact:
        raise UsageError("--compact traces the model: give --input-shape (or --calibration batches)")
    try:
        pruner = Pruner(loaded.model, sparsity, **options)
        pruner.prune()
        model = pruner.remove()
        if compact:
            model = compact_model(model, example_inputs, exclude=options.get("exclude"), inplace=True)
    except UsageError:
        raise
    except USER_ERRORS as err:
        raise UsageError(f"pruning {loaded.source} failed: {one_line(err)}") from None
    return model


def _write(model, loaded: LoadedModel, out: Path) -> None:
    """Write into a temporary sibling, then rename: a failure leaves ``out`` absent."""
    from ..saving import save_pruned

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if loaded.kind == "huggingface":
            model.save_pretrained(staging / "model")
            _copy_tokenizer(loaded.folder, staging / "model")
        else:
            save_pruned(model, staging / "model")
        os.replace(staging / "model", out)
    except USER_ERRORS as err:
        raise UsageError(f"writing {out} failed: {one_line(err)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "spiece.model", "added_tokens.json",
)  # fmt: skip


def _copy_tokenizer(source: Path | None, target: Path) -> None:
    """The pruned folder keeps the source folder's tokenizer files, so it is usable as it is."""
    for name in _TOKENIZER_FILES if source is not None else ():
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def _report(model, example_inputs: Any, args: Any) -> dict[str, Any]:
    from ..summary import summary

    table = summary(model, example_inputs=example_inputs)
    if getattr(args, "json", False):
        print(json.dumps({"out": str(args.out), **table.to_dict()}, indent=2))
    else:
        print(f"pruned {args.model} as {args.recipe} says; written to {args.out}")
        print(table)
    return table.to_dict()


def read_calibration(path_text: str, loaded: LoadedModel, settings: dict[str, Any]) -> list:
    """Calibration batches from a ``.pt`` file (a tensor, split along its first dimension into batches
    of ``batch_size``, or a list of batches) or a text file (tokenised; needs a Hugging Face folder)."""
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"--calibration {path_text}: no such file")
    batch_size = int(settings.get("batch_size") or 16)
    samples = settings.get("samples")
    if path.suffix in (".pt", ".pth"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UsageError(
                f"--calibration {path_text}: not a tensor file torch.load reads ({one_line(err)})"
            ) from None
        if isinstance(data, torch.Tensor):
            data = data[: samples or None]
            return list(data.split(batch_size)) if data.dim() else [data]
        if isinstance(data, (list, tuple)) and data:
            return list(data)
        raise UsageError(
            f"--calibration {path_text} holds a {type(data).__name__}; expected a tensor or a list of batches"
        )
    return _tokenised(path, loaded, batch_size, samples, settings.get("sequence_length"))


def _tokenised(path: Path, loaded: LoadedModel, batch_size: int, samples: int | None, length: int | None) -> list:
    if loaded.kind != "huggingface":
        raise UsageError(
            f"--calibration {path} is text, which needs a tokenizer: use a Hugging Face folder as MODEL, or "
            "save token ids (or inputs) as a .pt tensor file"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(loaded.folder)
    except Exception as err:
        raise UsageError(f"cannot read the tokenizer of {loaded.folder}: {one_line(err)}") from None
    ids = tokenizer(path.read_text(), return_tensors="pt")["input_ids"].reshape(-1)
    length = int(length or min(128, ids.numel()))
    count = ids.numel() // length if length else 0
    if count == 0:
        raise UsageError(f"--calibration {path} has {ids.numel()} tokens, fewer than one sequence of {length}")
    sequences = ids[: count * length].reshape(count, length)[: samples or None]
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in sequences.split(batch_size)]
