"""Run every benchmark and write their tables into README.md.

    .venv/bin/python bench/run_all.py [--no-readme]

Each benchmark is a standalone script printing markdown; this runs them one
after the other (never in parallel: they share 2 cores), then replaces the
README section between the bench markers with the results and the machine
they were measured on. Figures are ratios measured within one run where a
baseline exists, since the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

BENCHES = [
    ("REST throughput and latency (otpd vs a bare aiohttp echo)", ["rest_load.py"]),
    ("Start-up time and memory", ["startup.py"]),
    ("Store size and verify latency as OTPs accumulate", ["store_scale.py"]),
    ("Modem pool utilisation against the physical limit", ["sms_pool.py"]),
    ("Email OTPs against the SMTP round-trip limit (pooled sessions vs a connection per"
     " message)", ["email_sessions.py"]),
    ("Broker ingest (otpd vs the raw client library)", ["broker_ingest.py"]),
    ("Several nodes on one queue (work follows sending capacity)", ["shared_queue.py"]),
    ("WebSocket broker fan-out (otpd broker vs a bare websockets relay)",
     ["broker_fanout.py"]),
]


def run(script: list[str]) -> str:
    path = ROOT / "bench" / script[0]
    if not path.exists():
        return f"_{script[0]} is not there._\n"
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '')}"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(path), *script[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    took = time.monotonic() - t0
    out = proc.stdout.strip()
    if proc.returncode != 0 and not out:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return f"_{script[0]} failed (exit {proc.returncode}):_\n\n```\n{tail}\n```\n"
    missed = " — exit 1: a goal was missed, see above" if proc.returncode else ""
    return f"{out}\n\n_({script[0]}, {took:.0f} s{missed})_\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-readme", action="store_true", help="print only")
    args = parser.parse_args()
    parts = [
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores, "
        f"{platform.machine()}, Python {platform.python_version()}, with "
        "`.venv/bin/python bench/run_all.py`.\n"
    ]
    for title, script in BENCHES:
        print(f"== {title}", flush=True)
        result = run(script)
        print(result, flush=True)
        parts.append(f"#### {title}\n\n{result}")
    section = "\n".join(parts)
    if args.no_readme:
        return
    text = README.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = f"{head}{START}\n{section}\n{END}{tail}"
    else:
        text += f"\n## Benchmarks\n\n{START}\n{section}\n{END}\n"
    README.write_text(text)
    print(f"README.md updated ({README})")


if __name__ == "__main__":
    main()
