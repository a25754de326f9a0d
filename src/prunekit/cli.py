"""The ``prunekit`` command line.

::

    prunekit --version
    prunekit demo [--sparsity 0.9] [--steps 1500] [--out prunekit-demo.png] [--seed 0] [--quiet]
    prunekit summary MODULE:FACTORY [--input-shape 1,3,224,224]

``python -m prunekit`` does the same. Mistakes (a bad argument, a factory that cannot be imported, a
model that does not accept the input shape) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from . import __version__

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake of the user's; reported as one line on stderr, exit status 2."""


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
            "Import MODULE, call FACTORY() to build a model (or take it as is if it already is an nn.Module) "
            "and print prunekit.summary of it. The current directory is importable."
        ),
    )
    summary.add_argument("factory", metavar="MODULE:FACTORY", help="e.g. torchvision.models:resnet18")
    summary.add_argument(
        "--input-shape",
        metavar="SHAPE",
        help="comma-separated shape of a random example input, e.g. 1,3,224,224, to count conv MACs",
    )
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
        raise UsageError("choose a command: demo or summary (see prunekit --help)")
    except UsageError as err:
        print(f"prunekit: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("prunekit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


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


def load_factory(spec: str):
    """Resolve ``"package.module:attribute"`` (the attribute may be dotted) to the object it names.

    The current directory is importable, as with ``python -m``. Raises :class:`UsageError` with a
    one-line message when the spec is malformed or cannot be imported.
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
        raise UsageError(f"importing {module_name!r} failed: {_one_line(err)}") from None
    except Exception as err:  # the module itself raised (syntax error, missing dependency, ...)
        raise UsageError(f"importing {module_name!r} failed: {_one_line(err)}") from None
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


def _summary(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from .summary import summary

    shape = _parse_shape(args.input_shape) if args.input_shape is not None else None
    factory = load_factory(args.factory)
    if isinstance(factory, nn.Module):
        model = factory
    elif callable(factory):
        try:
            model = factory()
        except Exception as err:
            raise UsageError(f"{args.factory}() failed: {_one_line(err)}") from None
    else:
        raise UsageError(f"{args.factory} is a {type(factory).__name__}, not a callable that returns a model")
    if not isinstance(model, nn.Module):
        raise UsageError(f"{args.factory}() returned a {type(model).__name__}, not a torch.nn.Module")

    example_inputs = None
    if shape is not None:
        param = next(model.parameters(), None)
        example_inputs = torch.randn(shape, device=param.device if param is not None else None)
    try:
        table = summary(model, example_inputs=example_inputs)
    except Exception as err:
        if shape is None:
            raise
        raise UsageError(f"running the model on an input of shape {shape} failed: {_one_line(err)}") from None
    where = "" if shape is None else f", input shape {tuple(shape)}"
    print(f"{type(model).__name__} from {args.factory}{where}")
    print(table)
    return EXIT_OK
