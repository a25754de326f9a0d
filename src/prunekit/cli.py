"""The ``prunekit`` command line.

::

    prunekit --version
    prunekit demo [--sparsity 0.9] [--steps 1500] [--out prunekit-demo.png] [--seed 0] [--quiet]
    prunekit summary MODEL [--factory MODULE:FACTORY] [--input-shape 1,3,224,224] [--json] [--max-depth K]
    prunekit prune MODEL --recipe r.yaml --out PATH [--factory MODULE:FACTORY] [--calibration FILE]
                   [--compact] [--input-shape 1,3,224,224] [--json]
    prunekit reproduce RECIPE [--smoke] [--data DIR] [--out FILE.md] [--json]

MODEL is ``MODULE:FACTORY`` (e.g. ``torchvision.models:resnet18``), a file saved with
``pk.save_pruned`` (rebuilt into ``--factory``'s architecture) or a Hugging Face folder.

``python -m prunekit`` does the same. Mistakes (a bad argument, a factory that cannot be imported, a
model that does not accept the input shape) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from . import __version__
from .commands.models import LoadedModel, UsageError, example_inputs_for, load_factory, load_model
from .commands.models import one_line as _one_line

__all__ = ["main", "load_factory", "UsageError"]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised as :class:`UsageError` instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="prunekit",
        description="Make PyTorch models smaller and faster by pruning.",
    )
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="prune an MLP on scikit-learn's digits and plot accuracy against sparsity",
        description=(
            "Train a small MLP on scikit-learn's handwritten digits, prune it gradually during training, "
            "print its summary before and after, and plot test accuracy against sparsity next to one-shot "
            'pruning without retraining. Needs the demo extra: pip install "prunekit[demo]".'
        ),
    )
    demo.add_argument(
        "--sparsity",
        type=float,
        default=0.9,
        help="final fraction of the weights to prune, in (0, 1) (default: 0.9, i.e. 90%%)",
    )
    demo.add_argument("--steps", type=int, default=1500, help="total optimizer steps, at least 100 (default: 1500)")
    demo.add_argument(
        "--out",
        default="prunekit-demo.png",
        help="file to write the plot to; PNG unless the extension says .svg, .pdf, ... (default: prunekit-demo.png)",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the data split, initialisation and batch order (default: 0)"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bar or tables; print only a one-line result")

    summary = commands.add_parser(
        "summary",
        help="print parameters, non-zeros, sparsity and MACs of a model",
        description=(
            "Print prunekit.summary of MODEL: MODULE:FACTORY (FACTORY() is called, or taken as is if it already "
            "is an nn.Module; the current directory is importable), a file saved with pk.save_pruned (give "
            "--factory) or a Hugging Face folder."
        ),
    )
    _model_arguments(summary)
    summary.add_argument("--json", action="store_true", help="print the summary as JSON")
    summary.add_argument(
        "--max-depth", type=int, metavar="K", help="one row per module at most K deep (1: the model's children)"
    )

    prune = commands.add_parser(
        "prune",
        help="prune a model once, as a recipe says, and save it",
        description=(
            "Prune MODEL (as for summary) once, as the recipe says, write it to --out (save_pretrained for a "
            "Hugging Face folder, pk.save_pruned otherwise) and print its summary. Nothing is written on a mistake."
        ),
    )
    _model_arguments(prune)
    prune.add_argument("--recipe", required=True, help="the recipe: a YAML file of pruner arguments")
    prune.add_argument("--out", required=True, help="where to write the pruned model (must not exist)")
    prune.add_argument(
        "--calibration",
        metavar="FILE",
        help="batches for criteria that read activations: a .pt tensor file or a text file (tokenised by the folder's tokenizer)",
    )
    prune.add_argument("--compact", action="store_true", help="remove the pruned channels (structured recipes)")
    prune.add_argument("--json", action="store_true", help="print the summary as JSON")

    reproduce = commands.add_parser(
        "reproduce",
        help="run a shipped recipe's study and print its number beside the committed one",
        description=(
            "Run the study of RECIPE (a recipe with a 'study' section, e.g. recipes/han_lenet300_32x.yaml): "
            "train, prune and evaluate as it says, with prunekit.bench, and print the measured number beside "
            "the committed one. Nothing is written unless --out is given."
        ),
    )
    reproduce.add_argument("recipe", metavar="RECIPE", help="a recipe YAML file with a study section")
    reproduce.add_argument(
        "--smoke", action="store_true", help="the recipe's smallest form: a check that it runs, not of its number"
    )
    reproduce.add_argument("--data", metavar="DIR", help="folder of the MNIST test-set files (default: the recipe's)")
    reproduce.add_argument("--out", metavar="FILE", help="also write the result as Markdown to FILE")
    reproduce.add_argument("--json", action="store_true", help="print the result (per-seed rows included) as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = _build_parser()
    try:
        try:
            args = parser.parse_args(None if argv is None else [os.fspath(arg) for arg in argv])
        except SystemExit as done:  # --help and --version
            return done.code if isinstance(done.code, int) else EXIT_OK
        if args.command == "demo":
            return _demo(args)
        if args.command == "summary":
            return _summary(args)
        if args.command == "prune":
            from .commands.prune import run_prune

            args.input_shape = _parse_shape(args.input_shape) if args.input_shape is not None else None
            run_prune(args)
            return EXIT_OK
        if args.command == "reproduce":
            from .commands.reproduce import run_reproduce

            run_reproduce(args)
            return EXIT_OK
        raise UsageError("choose a command: demo, summary, prune or reproduce (see prunekit --help)")
    except UsageError as err:
        print(f"prunekit: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("prunekit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        result = run_demo(sparsity=args.sparsity, steps=args.steps, out=args.out, seed=args.seed, quiet=args.quiet)
    except ImportError as err:  # the demo extra is missing; the message says how to install it
        raise UsageError(str(err)) from None
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(f"cannot write the plot to {args.out}: {err.strerror or err}") from None
    if args.quiet:
        print(
            f"dense accuracy {result['dense_accuracy']:.1%}, pruned accuracy {result['pruned_accuracy']:.1%} "
            f"at sparsity {result['sparsity']:.1%}; plot written to {result['plot']}"
        )
    return EXIT_OK


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        raise UsageError(
            f"--input-shape must be comma-separated whole numbers like 1,3,224,224, got {text!r}"
        ) from None
    if not shape or any(size < 1 for size in shape):
        raise UsageError(f"--input-shape sizes must be positive, got {text!r}")
    return shape


def _model_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "model",
        metavar="MODEL",
        help="MODULE:FACTORY (e.g. torchvision.models:resnet18), a pk.save_pruned file or a Hugging Face folder",
    )
    command.add_argument(
        "--factory", metavar="MODULE:FACTORY", help="the architecture a pk.save_pruned file is rebuilt into"
    )
    command.add_argument(
        "--input-shape",
        metavar="SHAPE",
        help="comma-separated shape of a random example input, e.g. 1,3,224,224, to count conv MACs",
    )


def _summary(args: argparse.Namespace) -> int:
    from .summary import summary

    shape = _parse_shape(args.input_shape) if args.input_shape is not None else None
    loaded: LoadedModel = load_model(args.model, args.factory)
    example_inputs = example_inputs_for(loaded, shape, None)
    if args.max_depth is not None and args.max_depth < 1:
        raise UsageError(f"--max-depth is a module depth, at least 1, got {args.max_depth}")
    try:
        table = summary(loaded.model, example_inputs=example_inputs, max_depth=args.max_depth)
    except Exception as err:
        if example_inputs is None:
            raise
        what = f"an input of shape {shape}" if shape is not None else "its dummy inputs"
        raise UsageError(f"running the model on {what} failed: {_one_line(err)}") from None
    if args.json:
        print(json.dumps({"model": args.model, **table.to_dict()}, indent=2))
        return EXIT_OK
    where = "" if shape is None else f", input shape {tuple(shape)}"
    print(f"{type(loaded.model).__name__} from {args.model}{where}")
    print(table)
    return EXIT_OK
