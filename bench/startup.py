"""Start-up time to READY and memory of `otpd run`.

The daemon runs as systemd would run it: a NOTIFY_SOCKET datagram socket
receives its READY=1. Measured: time from spawn to READY=1, to the first
answered /healthz, and the resident memory idle and after 2,000 requests.

    .venv/bin/python bench/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from otpd.auth.htpasswd import set_user  # noqa: E402
from tests.support.daemon import core_tables, free_port  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def config(state: Path, port: int) -> Path:
    set_user(state / "users", "bench", "bench-password", cost=4)
    path = state / "otpd.toml"
    path.write_text(core_tables(state, port) + f"""
[log]
level = "warning"
[limits]
enabled = false  # 2,000 requests from one address would be rate limited
[[smtp]]
host = "127.0.0.1"
port = {free_port()}
sender = "a@example.com"
""")
    return path


def one_run(state: Path) -> tuple[float | None, float, float, float]:
    port = free_port()
    cfg = config(state, port)
    notify_path = state / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.05)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "otpd", "run", "--config", str(cfg)],
                            cwd=ROOT, env=env)
    ready_at: float | None = None
    healthy_at: float | None = None
    try:
        deadline = t0 + 30
        while time.perf_counter() < deadline and (ready_at is None or healthy_at is None):
            try:
                if b"READY=1" in notify.recv(4096):
                    ready_at = time.perf_counter() - t0
            except TimeoutError:
                pass
            if healthy_at is None:
                try:
                    url = f"http://127.0.0.1:{port}/healthz"
                    with urllib.request.urlopen(url, timeout=1):
                        healthy_at = time.perf_counter() - t0
                except (urllib.error.URLError, ConnectionError):
                    pass
            if ready_at is None and healthy_at is not None and time.perf_counter() > (
                    t0 + healthy_at + 2):
                break  # this build does not send READY=1
        time.sleep(2.0)
        idle = rss_mb(proc.pid)
        body = b'{"command":"echo","data":{}}'
        auth = {"Authorization": "Basic YmVuY2g6YmVuY2gtcGFzc3dvcmQ="}  # bench:bench-password
        for _ in range(2000):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/otp", data=body,
                                         headers=auth)
            with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 (http only)
                resp.read()
        loaded = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        notify.close()
    return ready_at, healthy_at or float("nan"), idle, loaded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            results.append(one_run(Path(tmp)))
    ready = [r[0] for r in results if r[0] is not None]
    print(f"\n{args.runs} starts of `otpd run` (store, REST API, SMTP channel)\n")
    print("| measure | median | worst |")
    print("|---|---|---|")
    if ready:
        print(f"| spawn to READY=1 (sd_notify) | {statistics.median(ready):.2f} s |"
              f" {max(ready):.2f} s |")
    healthy = [r[1] for r in results]
    print(f"| spawn to first /healthz answer | {statistics.median(healthy):.2f} s |"
          f" {max(healthy):.2f} s |")
    idle = [r[2] for r in results]
    loaded = [r[3] for r in results]
    print(f"| RSS idle | {statistics.median(idle):.1f} MB | {max(idle):.1f} MB |")
    print(f"| RSS after 2,000 requests | {statistics.median(loaded):.1f} MB |"
          f" {max(loaded):.1f} MB |")


if __name__ == "__main__":
    main()
