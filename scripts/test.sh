#!/usr/bin/env bash
# The whole test suite, with its own set-up: virtual environment, install,
# lint (ruff), types (mypy), import contracts (lint-imports), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh test
.venv/bin/ruff check otpd tests bench
if command -v shellcheck >/dev/null; then
    shellcheck scripts/*.sh .ci/run
fi
.venv/bin/mypy
.venv/bin/lint-imports  # the layers (pyproject.toml [tool.importlinter])
.venv/bin/python -m pytest -q "$@"
