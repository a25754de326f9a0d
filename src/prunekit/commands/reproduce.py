"""``prunekit reproduce RECIPE [--smoke] [--data DIR] [--out FILE.md] [--json]``: run a shipped recipe's
study (:mod:`prunekit.bench.studies`) and print its number beside the committed one.

``--smoke`` runs the recipe's smallest form (a few images, short training, one seed: a check that it
runs, not of its number); ``--data`` is the folder of the MNIST test-set files; ``--out`` also writes the
result as Markdown (command, date, machine, versions). A recipe without a valid study, or whose pruner
arguments are not what its study runs, prints one line and exits with status 2, writing nothing.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from .models import UsageError


def run_reproduce(args: Any) -> dict[str, Any]:
    """Do ``prunekit reproduce`` for parsed ``args``; returns the result as a dict (after printing it)."""
    from ..bench.studies import reproduce

    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    if not Path(args.recipe).is_file():
        raise UsageError(f"recipe file {args.recipe!r} does not exist")
    try:
        result = reproduce(args.recipe, smoke=args.smoke, data=args.data)
    except ImportError as err:
        raise UsageError(str(err)) from None
    except ValueError as err:  # RecipeError: says where and what
        raise UsageError(str(err).splitlines()[0]) from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.summary_line())
        for key, value in result.details.items():
            if key != "rows":
                print(f"  {key}: {value}")
    if out is not None:
        command = "prunekit reproduce " + " ".join(
            shlex.quote(part)
            for part in [
                args.recipe,
                *(["--smoke"] if args.smoke else []),
                *(["--data", args.data] if args.data else []),
            ]
        )
        out.write_text(result.to_markdown(command))
    return result.to_dict()
