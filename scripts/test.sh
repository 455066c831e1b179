#!/usr/bin/env bash
# The whole test suite, with its own set-up: virtual environment, install,
# lint (ruff), types (mypy), import contracts (lint-imports), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh test
# The browser tests need Debian's chromium and chromium-driver: installed here
# when running as root (as .ci/run does); otherwise those tests skip with the reason.
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null &&
   ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
.venv/bin/ruff check otpd tests bench
if command -v shellcheck >/dev/null; then
    shellcheck scripts/*.sh .ci/run
fi
.venv/bin/mypy
.venv/bin/lint-imports  # the layers (pyproject.toml [tool.importlinter])
.venv/bin/python -m pytest -q "$@"
