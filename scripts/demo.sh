#!/usr/bin/env bash
# Runs otpd in demo mode: a simulated GSM modem on a pseudo-terminal, a local
# mail sink, and the REST API on http://127.0.0.1:8899 (user demo / password demo).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh demo
exec .venv/bin/otpd demo "$@"
