"""``python -m prunekit``: the same as the ``prunekit`` command (see :mod:`prunekit.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
