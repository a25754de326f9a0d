#!/usr/bin/env bash
# Install prunekit with its test dependencies into ./.venv, lint, and run the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"` to skip the slow tests).
# TORCH_SPEC picks the torch build; the default is the CPU wheel this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" -e ".[test]"
.venv/bin/python -m ruff check src tests benchmarks
.venv/bin/python -m pytest "$@"
