"""Email OTPs against the round-trip limit: pooled SMTP sessions vs a connection per message.

`otpd run` (a subprocess, REST on loopback, the default delivery.wait: each
request-otp is answered once its mail is handed off) mails through an aiosmtpd
server that offers PIPELINING, as providers do.

1. Behind a latency proxy (this script, asyncio, 127.0.0.1) that delays every
   chunk by --delay s each way, so a round trip costs RTT = 2 x delay. Rows:
   the pool (--sessions sessions, PIPELINING), the pool one command at a time,
   and today's path before pooling (2 senders, a new connection per message:
   ``max_messages_per_session = 1``, no pipelining). Throughput is --burst
   request-otp sent at once (after the pool is warm), from the first request
   to the last answer; the limit is what the round trips allow the sessions:
   sessions / (round trips per message x RTT), 2 round trips pipelined
   (RSET+MAIL+RCPT+DATA, then the message), 4 without (MAIL, RCPT, DATA, the
   message). Latency: --latency single request-otp one after another on the
   warm pool; goal p50 within one message exchange (2 RTT pipelined) plus a
   few ms, not a connection set-up (TCP, greeting, EHLO, STARTTLS, TLS, EHLO,
   AUTH: 5-8 RTT).
2. Plain loopback (the SMTP server in its own process): --requests request-otp
   at 1, 8 and 32 clients; goal >= 800 req/s at 32 clients.

    .venv/bin/python bench/email_sessions.py [--delay 0.025] [--sessions 8] [--burst 200]
        [--latency 20] [--requests 2000]

Connections are counted at the SMTP server. Bounded: every phase has a deadline.
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
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from otpd.auth.htpasswd import set_user  # noqa: E402
from tests.support.daemon import core_tables, free_port  # noqa: E402
from tests.support.mail import LatencyProxy, ProviderServer, ProviderSink  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402

USER, PASSWORD = "bench", "bench-password"
OTP_LINES = "max_attempts = 100\nmax_lifetime = 3600\ndefault_lifetime = 3600"
PHASE_LIMIT = 120.0  # s at most per measured run
CONNECTIONS = 48  # HTTP connections at most: otpd caps them per address (64)
_serial = iter(range(10**9))


# --- the SMTP server in its own process (plain loopback phase) ----------------------


def serve_sink(port: int) -> None:
    """An aiosmtpd server offering PIPELINING; answers "stats" lines on stdin."""
    server = ProviderServer(ProviderSink(), port)
    server.start()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps({"messages": len(server.sink.received),
                              "sessions": server.sessions.opened}), flush=True)
    server.stop()


class SinkProcess:
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-sink", str(port)],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def stats(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        answer: dict[str, int] = json.loads(self.proc.stdout.readline())
        return answer

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


class ThreadSink:
    """The SMTP server in this process (the proxied phase: tens of messages a second)."""

    def __init__(self, port: int) -> None:
        self.server = ProviderServer(ProviderSink(), port)
        self.server.start()

    def stats(self) -> dict[str, int]:
        return {"messages": len(self.server.sink.received),
                "sessions": self.server.sessions.opened}

    def stop(self) -> None:
        self.server.stop()


# --- otpd -----------------------------------------------------------------------------


def smtp_table(port: int, sessions: int, per_session: int, pipelining: bool) -> str:
    return f"""
[[smtp]]
name = "provider"
host = "127.0.0.1"
port = {port}
security = "none"
sender = "OTP <otp@example.com>"
timeout = 10
max_sessions = {sessions}
max_messages_per_session = {per_session}
pipelining = {str(pipelining).lower()}
"""


class Otpd:
    def __init__(self, state: Path, smtp: str, profile: str | None = None) -> None:
        set_user(state / "users", USER, PASSWORD, cost=4)
        self.port = free_port()
        config = state / "otpd.toml"
        config.write_text(core_tables(state, self.port, OTP_LINES) + f"""
[log]
level = "warning"
[limits]
enabled = false  # one client sending thousands of OTPs: measures otpd, not the limiter
{smtp}""")
        python = [sys.executable, "-m", "cProfile", "-o", profile] if profile else [
            sys.executable]
        self.proc = subprocess.Popen([*python, "-m", "otpd", "run", "--config", str(config)],
                                     cwd=ROOT, env={**os.environ})
        self.url = f"http://127.0.0.1:{self.port}/api/otp"

    async def ready(self, session: aiohttp.ClientSession) -> None:
        async def answers() -> bool:
            try:
                async with session.post(self.url, data=b"{}") as r:
                    await r.read()
                    return True
            except aiohttp.ClientError:
                return False

        await wait_until(answers, 15, "otpd to answer", interval=0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


HEADERS = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
           "Content-Type": "application/json"}


async def request_otp(session: aiohttp.ClientSession, url: str) -> tuple[float, str]:
    i = next(_serial)
    body = {"command": "request-otp", "data": {"receiver": f"user{i}@example.org",
                                               "reference": f"ref-{i}",
                                               "message": "Your OTP is %s"}}
    t0 = time.perf_counter()
    async with session.post(url, data=json.dumps(body), headers=HEADERS) as resp:
        answer = await resp.json(content_type=None)
    return time.perf_counter() - t0, str(answer.get("response_code"))


async def load(session: aiohttp.ClientSession, url: str, total: int, clients: int
               ) -> dict[str, Any]:
    """``total`` request-otp from ``clients`` clients, each waiting for its answer."""
    left = iter(range(total))
    latencies: list[float] = []
    codes: dict[str, int] = {}
    deadline = time.monotonic() + PHASE_LIMIT

    async def client() -> None:
        for _ in left:
            if time.monotonic() > deadline:
                return
            took, code = await request_otp(session, url)
            latencies.append(took)
            codes[code] = codes.get(code, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"n": len(latencies), "seconds": elapsed, "rate": len(latencies) / elapsed,
            "p50": statistics.median(latencies) * 1000,
            "p99": latencies[max(int(len(latencies) * 0.99) - 1, 0)] * 1000, "codes": codes}


async def warm(session: aiohttp.ClientSession, url: str, sessions: int) -> None:
    """Open the pool's sessions (one burst as wide as the pool), then let them idle."""
    await asyncio.gather(*(request_otp(session, url) for _ in range(sessions * 2)))


# --- phases ------------------------------------------------------------------------------


async def proxied(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    variants = [
        (f"pool: {args.sessions} sessions, PIPELINING", args.sessions, 100, True, 2),
        (f"pool: {args.sessions} sessions, one command at a time", args.sessions, 100, False,
         4),
        ("before: 2 senders, a connection per message", 2, 1, False, None),
    ]
    rtt = 2 * args.delay
    for name, sessions, per_session, pipelining, trips in variants:
        sink = ThreadSink(free_port())
        proxy = LatencyProxy(sink.server.port, args.delay)
        await proxy.start()
        with tempfile.TemporaryDirectory() as tmp:
            otpd = Otpd(Path(tmp), smtp_table(proxy.port, sessions, per_session, pipelining))
            try:
                async with aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=CONNECTIONS)) as session:
                    await otpd.ready(session)
                    await warm(session, otpd.url, sessions)
                    single = [await request_otp(session, otpd.url)
                              for _ in range(args.latency)]
                    before = sink.stats()
                    turns0 = proxy.turns
                    burst = await load(session, otpd.url, args.burst, args.burst)
                    after = sink.stats()
            finally:
                otpd.stop()
                await proxy.stop()
                sink.stop()
        limit = sessions / (trips * rtt) if trips else None
        sent = after["messages"] - before["messages"]
        rows.append({
            "name": name, "sessions": sessions, "burst": burst, "limit": limit,
            "ratio": burst["rate"] / limit if limit else None,
            "connections": after["sessions"] - before["sessions"], "sent": sent,
            "trips": (proxy.turns - turns0) / sent if sent else 0.0,
            "single_p50": statistics.median(t for t, _ in single) * 1000,
            "single_codes": sorted({c for _, c in single}),
        })
        print(f"  {name}: {burst['rate']:.1f} msg/s, single p50"
              f" {rows[-1]['single_p50']:.0f} ms", file=sys.stderr, flush=True)
    return rows


async def loopback(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    sink = SinkProcess(free_port())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            otpd = Otpd(Path(tmp), smtp_table(sink.port, args.sessions, 100, True),
                        profile=args.profile)
            try:
                async with aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=CONNECTIONS)) as session:
                    await otpd.ready(session)
                    await warm(session, otpd.url, args.sessions)
                    for clients in (1, 8, 32) if not args.profile else (32,):
                        before = sink.stats()
                        result = await load(session, otpd.url, args.requests, clients)
                        after = sink.stats()
                        rows.append({"clients": clients, **result,
                                     "connections": after["sessions"] - before["sessions"],
                                     "sent": after["messages"] - before["messages"]})
                        print(f"  loopback {clients} clients: {result['rate']:.0f} req/s",
                              file=sys.stderr, flush=True)
            finally:
                otpd.stop()
    finally:
        sink.stop()
    return rows


async def main(args: argparse.Namespace) -> int:
    if args.profile:  # cProfile of otpd over a 32-client loopback run, nothing else
        await loopback(args)
        return 0
    proxied_rows = await proxied(args)
    loop_rows = await loopback(args)
    rtt_ms = 2 * args.delay * 1000
    print(f"\nBehind a proxy adding {args.delay * 1000:.0f} ms each way (RTT {rtt_ms:.0f} ms),"
          f" aiosmtpd offering PIPELINING; {args.burst} request-otp at once (over"
          f" {CONNECTIONS} HTTP connections) on a warm pool;"
          f" single: {args.latency} one at a time, idle pool\n")
    print("| path | msg/s | limit | ratio | round trips/msg | SMTP connections | single p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in proxied_rows:
        limit = f"{r['limit']:.1f}" if r["limit"] else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        print(f"| {r['name']} | {r['burst']['rate']:.1f} | {limit} | {ratio} |"
              f" {r['trips']:.2f} | {r['connections']} for {r['sent']} |"
              f" {r['single_p50']:.0f} |")
    base = proxied_rows[-1]["burst"]["rate"]
    print(f"\npooled + PIPELINING vs a connection per message: "
          f"{proxied_rows[0]['burst']['rate'] / base:.1f}x the throughput")
    print(f"\nPlain loopback, {args.requests} request-otp per row (answered after the SMTP"
          f" hand-off), pool of {args.sessions} sessions, SMTP server in its own process\n")
    print("| clients | req/s | p50 ms | p99 ms | SMTP connections | mails | codes |")
    print("|---|---|---|---|---|---|---|")
    for r in loop_rows:
        print(f"| {r['clients']} | {r['rate']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} |"
              f" {r['connections']} | {r['sent']} | {r['codes']} |")
    pooled = proxied_rows[0]
    goals = {
        "proxied ratio >= 0.8": (pooled["ratio"] or 0) >= 0.8,
        "single p50 <= one exchange (2 RTT) + 15 ms": pooled["single_p50"]
        <= 2 * rtt_ms + 15,
        "loopback >= 800 req/s at 32 clients": loop_rows[-1]["rate"] >= 800,
        "every request answered 0000": all(
            set(r["codes"]) == {"0000"} for r in loop_rows) and set(
            pooled["burst"]["codes"]) == {"0000"},
    }
    print("\ngoals: " + ", ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in goals.items()))
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.025, help="s each way")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--latency", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--serve-sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--profile", help="cProfile output of otpd (loopback, 32 clients)")
    arguments = parser.parse_args()
    if arguments.serve_sink:
        serve_sink(arguments.serve_sink)
    else:
        sys.exit(asyncio.run(main(arguments)))
