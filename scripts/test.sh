#!/usr/bin/env bash
# Install prunekit with its test dependencies into ./.venv, lint, and run the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"` to skip the slow tests).
# TORCH_SPEC picks the torch build; the default is the build that torchvision 0.29.1 needs (a CUDA wheel,
# run on the CPU here), so the structured-pruning model matrix (torchvision, timm, transformers) runs too.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1} -e ".[test,models]"
.venv/bin/python -m ruff check src tests benchmarks
.venv/bin/python -m pytest "$@"
