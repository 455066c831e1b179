#!/usr/bin/env bash
# Creates (or reuses) .venv and installs otpd with the given extras.
# Usage: scripts/venv.sh EXTRAS   e.g. scripts/venv.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "otpd needs Python 3.11 or newer ($python is $("$python" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=".venv/.installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
    echo "Installing otpd${extras:+[$extras]} into .venv (log: .venv/pip.log) ..." >&2
    if ! { .venv/bin/python -m pip install --upgrade pip &&
           .venv/bin/python -m pip install -c requirements.lock -e ".${extras:+[$extras]}"
         } > .venv/pip.log 2>&1; then
        tail -n 30 .venv/pip.log >&2
        echo "pip install failed; the full log is .venv/pip.log" >&2
        exit 1
    fi
    touch "$stamp"
fi
