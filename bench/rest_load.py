"""REST load benchmark: otpd's verify-otp and request-otp against a bare aiohttp echo.

Everything runs on loopback in this one run (the ratios are what matter on a
shared, noisy machine): a bare aiohttp JSON echo server as the baseline, then
otpd (`otpd run` in a subprocess, email channel to a local sink, wait = 0)
under the same client load. Bounded in request count and time.

    .venv/bin/python bench/rest_load.py [--requests 4000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from otpd.auth.htpasswd import set_user  # noqa: E402
from tests.support.daemon import core_tables, free_port  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402

USER, PASSWORD = "bench", "bench-password"
OTP_LINES = "max_attempts = 100\nmax_lifetime = 3600\ndefault_lifetime = 3600"
TIME_LIMIT = 60.0


def serve_echo(port: int) -> None:
    """The baseline server, run in its own process like otpd."""

    async def run() -> None:
        await echo_server(port)
        await asyncio.Event().wait()

    asyncio.run(run())


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ})


async def wait_listening(url: str) -> None:
    async def answers() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.post(url, data=b"{}") as r:
                await r.read()
                return True
        except aiohttp.ClientError:
            return False

    await wait_until(answers, 10, f"{url} to answer", interval=0.05)


async def echo_server(port: int) -> web.AppRunner:
    async def echo(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        return web.json_response({"command": body.get("command"), "response_code": "0000",
                                  "data": body.get("data", {})})

    app = web.Application()
    app.router.add_post("/api/otp", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def load(url: str, make_body: Callable[[int], dict[str, Any]], total: int,
               concurrency: int) -> dict[str, float]:
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
    latencies: list[float] = []
    codes: dict[str, int] = {}
    # Warm-up indexes are far from the measured ones so they never collide.
    counter = iter(range(10**7, 10**7 + 50))
    deadline = time.monotonic() + TIME_LIMIT
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for i in counter:
                if time.monotonic() > deadline:
                    return
                t0 = time.perf_counter()
                async with session.post(url, data=json.dumps(make_body(i)),
                                        headers=headers) as resp:
                    body = await resp.json(content_type=None)
                latencies.append(time.perf_counter() - t0)
                code = body.get("response_code", "?")
                codes[code] = codes.get(code, 0) + 1

        await worker()  # warms the connection and the password cache
        counter = iter(range(total))
        latencies.clear()
        codes.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "n": len(latencies),
        "codes": codes,  # type: ignore[dict-item]
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def main(args: argparse.Namespace) -> None:
    results: dict[str, dict[str, float]] = {}
    echo_port = free_port()
    echo = spawn(__file__, "--serve-echo", str(echo_port))
    try:
        await wait_listening(f"http://127.0.0.1:{echo_port}/api/otp")
        results["echo (bare aiohttp)"] = await load(
            f"http://127.0.0.1:{echo_port}/api/otp",
            lambda i: {"command": "verify-otp", "data": {"receiver": "0812", "otp": "1"}},
            args.requests, args.concurrency)
    finally:
        echo.terminate()
        echo.wait()

    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        set_user(state / "users", USER, PASSWORD, cost=10)
        port = free_port()
        config = state / "otpd.toml"
        config.write_text(core_tables(state, port, OTP_LINES) + f"""
[delivery]
wait = 0
[log]
level = "warning"
[limits]
enabled = false  # one address sending thousands of requests: measures otpd, not the limiter
# A modem whose port never appears: request-otp is measured as "queued", the
# ingest path alone (real modems take seconds per SMS, so sending costs no CPU).
[[modem]]
name = "absent"
port = "{state / 'no-such-tty'}"
""")
        proc = spawn("-m", "otpd", "run", "--config", str(config))
        try:
            url = f"http://127.0.0.1:{port}/api/otp"
            await wait_listening(url)
            await asyncio.sleep(1.0)
            idle = rss_mb(proc.pid)
            results["otpd request-otp (queued)"] = await load(url, lambda i: {
                "command": "request-otp", "data": {
                    "receiver": f"+6281{i:08d}", "reference": f"ref-{i}",
                    "message": "Your OTP is %s"}}, args.requests, args.concurrency)
            # verify-otp on the OTPs just made, with a wrong code: each one is a
            # real HMAC check and a durable attempt-counter write.
            results["otpd verify-otp"] = await load(url, lambda i: {
                "command": "verify-otp", "data": {
                    "receiver": f"+6281{i:08d}", "reference": f"ref-{i}",
                    "otp": "0000000"}}, args.requests, args.concurrency)
            loaded = rss_mb(proc.pid)
            if args.profile:
                prof = subprocess.Popen(["py-spy", "record", "-d", "8", "-f", "raw", "-o",
                                         args.profile, "-p", str(proc.pid), "-t"])
                await load(url, lambda i: {
                    "command": "request-otp", "data": {
                        "receiver": f"+6282{i:08d}", "reference": f"p-{i}",
                        "message": "Your OTP is %s"}}, args.requests * 3, args.concurrency)
                prof.wait()
        finally:
            proc.terminate()
            proc.wait(timeout=20)

    base = results["echo (bare aiohttp)"]["rps"]
    print(f"\n{args.requests} requests per row, {args.concurrency} concurrent clients, loopback\n")
    print("| run | req/s | ratio to echo | p50 ms | p99 ms | codes |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rps']:.0f} | {r['rps'] / base:.2f} | {r['p50']:.1f} |"
              f" {r['p99']:.1f} | {r['codes']} |")
    print(f"\notpd RSS: idle {idle:.1f} MB, after load {loaded:.1f} MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--serve-echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--profile", help="py-spy raw output file for a request-otp run")
    arguments = parser.parse_args()
    if arguments.serve_echo:
        serve_echo(arguments.serve_echo)
    else:
        asyncio.run(main(arguments))
